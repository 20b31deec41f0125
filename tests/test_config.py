"""The one configuration object: validation, flattening to MLflow params, CLI flags, MLproject."""
import argparse
import math

import pytest
import yaml

from conftest import REPO
from cvae.config import ConfigError
from pipelines.config import RunConfig, field_index, flatten, from_dict, from_params, to_dict, with_overrides
from pipelines.config_cli import add_config_arguments, config_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_params_round_trip_rebuilds_the_configuration():
    config = with_overrides(RunConfig(), {"model.hidden": "64,16,8", "model.latent_dim": 3, "lr": 3e-4,
                                          "batch_norm": "true", "dataset": "kmnist"})
    params = flatten(config)
    assert params["model.hidden"] == "64,16,8" and params["optim.lr"] == "0.0003"
    assert from_params(params) == config
    assert from_dict(to_dict(config)) == config


def test_mlflow_float_params_parse_as_integers():
    assert with_overrides(RunConfig(), {"latent_dim": "16.0", "epochs": "3.0"}).model.latent_dim == 16


def test_cli_flags_override_preset_and_empty_means_not_given():
    config = parse("--preset", "mlp-2d", "--latent-dim", "", "--epochs", "3", "--set", "model.activation=silu")
    assert config.model.latent_dim == 2  # from the preset: the empty flag did not override it
    assert config.optim.epochs == 3 and config.model.activation == "silu" and config.preset == "mlp-2d"
    assert parse("--latent_dim", "5").model.latent_dim == 5  # the form `mlflow run` appends


@pytest.mark.parametrize("overrides, field, accepted", [
    ({"arch": "transformer"}, "model.arch", "mlp"),
    ({"latent_dim": 0}, "model.latent_dim", ">= 1"),
    ({"lr": -0.1}, "optim.lr", "> 0"),
    ({"dataset": "cifar"}, "data.dataset", "fashion-mnist"),
    ({"conditioning": "film"}, "model.conditioning", "channel"),
    ({"likelihood": "poisson"}, "model.likelihood", "gaussian"),
    ({"device": "tpu"}, "execution.device", "cuda:N"),
    ({"hidden": "64,x"}, "model.hidden", "comma-separated"),
    ({"latent_dim": "2.5"}, "model.latent_dim", "integer"),
    ({"no_such_field": 1}, "no_such_field", "latent_dim"),
])
def test_invalid_values_name_the_field_and_what_is_accepted(overrides, field, accepted):
    with pytest.raises(ConfigError) as error:
        with_overrides(RunConfig(), overrides)
    assert field in str(error.value) and accepted in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="preset='nope'.*default"):
        parse("--preset", "nope")


def test_short_field_names_are_unique_across_sections():
    index = field_index()
    assert len(index) == sum(len(fields) for fields in [
        RunConfig().data.__dataclass_fields__, RunConfig().model.__dataclass_fields__,
        RunConfig().objective.__dataclass_fields__, RunConfig().optim.__dataclass_fields__,
        RunConfig().execution.__dataclass_fields__])


def test_mlproject_train_parameters_are_configuration_fields():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    index = field_index()
    for entry in ("main", "train"):
        spec = project["entry_points"][entry]
        for name in spec["parameters"]:
            assert name == "preset" or name in index, f"{entry}: {name} is no configuration field"
            assert "{" + name + "}" in spec["command"], f"{entry}: {name} is not passed to the command"


def test_numeric_options_accept_mlflow_floats_take_their_default_when_empty_and_name_the_parameter():
    from pipelines.entrypoints.command_line import CommandParser, add_flag, integer, number
    from pipelines.errors import UserError

    parser = CommandParser(prog="test")
    add_flag(parser, "n", type=integer(0), default=8)
    add_flag(parser, "tolerance", type=number(0), default=None)
    assert parser.parse_args([]).n == 8 and parser.parse_args(["--n", ""]).n == 8  # '': MLproject's "not given"
    assert parser.parse_args(["--n", "16.0"]).n == 16 and parser.parse_args(["--tolerance", "0.5"]).tolerance == 0.5
    for bad in ("abc", "-1", "nan", "inf", "2.5"):
        with pytest.raises(UserError, match=rf"^n={bad!r} is not valid; expected an integer >= 0$"):
            parser.parse_args(["--n", bad])


FLOAT_FIELDS = sorted(name for name, (_, _, typ) in field_index().items() if typ is float)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e999"])
def test_no_float_field_accepts_a_non_finite_number(name, text):
    section = field_index()[name][0]
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}=.* is not valid; expected a finite"):
        with_overrides(RunConfig(), {name: text})
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}="):
        with_overrides(RunConfig(), {name: float(text)})  # typed, as a search space returns it


def test_gaussian_std_is_limited_to_what_the_model_represents():
    from cvae.config import GAUSSIAN_STD_RANGE
    from cvae.model import LOG_STD_RANGE

    assert GAUSSIAN_STD_RANGE == pytest.approx(tuple(math.exp(v) for v in LOG_STD_RANGE))
    with_overrides(RunConfig(), {"gaussian_std": str(GAUSSIAN_STD_RANGE[1])})
    with pytest.raises(ConfigError, match=r"model.gaussian_std=8.0 is not valid; expected a number in \[0.002479, 7.389\]"):
        with_overrides(RunConfig(), {"gaussian_std": "8"})


@pytest.mark.parametrize("overrides, message", [
    ({"hidden": "64.5"}, "model.hidden='64.5' is not valid; expected comma-separated integers"),
    ({"hidden": "inf"}, "model.hidden='inf' is not valid"),
    ({"latent_dim": 2.5}, "model.latent_dim=2.5 is not valid; expected an integer"),
    ({"latent_dim": True}, "model.latent_dim=True is not valid; expected an integer"),
    ({"batch_norm": "maybe"}, "model.batch_norm='maybe' is not valid; expected true or false"),
    ({"arch": 3}, "model.arch=3 is not valid; expected a string"),
    ({"seed": "-1"}, "execution.seed=-1 is not valid; expected an integer in 0.."),
    ({"split_seed": str(2**64)}, "data.split_seed=18446744073709551616 is not valid"),
])
def test_values_of_the_wrong_kind_are_rejected_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        with_overrides(RunConfig(), overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_integers_parse_exactly_and_typed_values_pass_through():
    assert with_overrides(RunConfig(), {"seed": str(2**62 + 1)}).execution.seed == 2**62 + 1  # no float rounding
    config = with_overrides(RunConfig(), {"latent_dim": 8.0, "hidden": [64, 32], "lr": 1, "batch_norm": True})
    assert config.model.latent_dim == 8 and config.model.hidden == (64, 32) and config.optim.lr == 1.0
