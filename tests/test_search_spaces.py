"""Search spaces: every suggestion becomes a valid configuration, and spaces are found by name or path."""
from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from cvae.config import ConfigError
from cvae.likelihood import likelihood_kind
from pipelines.config import RunConfig, with_overrides
from pipelines.presets import PRESETS, preset_config, preset_names
from search_spaces import resolve_space, space_names
from search_spaces.architectures import comparable_presets

BASE = with_overrides(RunConfig(), {"data.dataset": "fashion-mnist", "data.limit_train": 1000,
                                    "optim.epochs": 3, "execution.device": "cpu"})


def sampled_configs(space_name: str, n: int = 40, base: RunConfig = BASE):
    """(trial, config) pairs drawn by a random sampler, so conditional branches are all visited."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = resolve_space(space_name)
    for _ in range(n):
        trial = study.ask()
        config = with_overrides(base, space(trial, base))
        study.tell(trial, 0.0)
        yield trial, config


def test_registry_lists_the_shipped_spaces():
    assert {"default", "architectures", "optimiser", "smoke"} <= set(space_names())


def test_default_space_has_the_documented_ranges_and_valid_configs():
    distributions: dict = {}
    archs = set()
    for trial, config in sampled_configs("default", 60):
        distributions.update(trial.distributions)
        archs.add(config.model.arch)
        assert 2 <= config.model.latent_dim <= 64
        assert 1e-4 <= config.optim.lr <= 1e-2
        assert config.data == BASE.data and config.optim.epochs == 3, "the base's data and epochs must hold"
        if config.model.arch == "mlp":
            assert set(trial.params) >= {"mlp_depth", "mlp_width"} and "conv_depth" not in trial.params
            assert len(config.model.hidden) == trial.params["mlp_depth"]
        else:
            assert set(trial.params) >= {"conv_depth", "conv_channels"} and "mlp_depth" not in trial.params
            assert len(config.model.channels) == trial.params["conv_depth"]
    assert archs == {"mlp", "conv"}
    assert distributions["latent_dim"] == IntDistribution(2, 64, log=True)
    assert distributions["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    kl = distributions["kl_weight"]
    assert isinstance(kl, FloatDistribution) and kl.log and kl.low <= 1e-3 and kl.high >= 4
    assert distributions["arch"] == CategoricalDistribution(["mlp", "conv"])


LIKELIHOOD_KEYS = ("likelihood", "gaussian_variance", "gaussian_std")


def _without_likelihood(model):
    return {k: v for k, v in vars(model).items() if k not in LIKELIHOOD_KEYS}


def test_architectures_space_uses_the_presets_model_and_keeps_the_base_training_and_likelihood():
    seen = set()
    for trial, config in sampled_configs("architectures", 40):
        name = trial.params["preset"]
        seen.add(name)
        preset = preset_config(name)
        assert config.preset == name
        assert _without_likelihood(config.model) == _without_likelihood(preset.model)
        assert config.objective == preset.objective
        assert (config.data, config.optim, config.execution) == (BASE.data, BASE.optim, BASE.execution)
    assert trial.distributions["preset"] == CategoricalDistribution(comparable_presets(BASE))
    assert len(seen) > 1


@pytest.mark.parametrize("study", [
    {"model.likelihood": "bernoulli", "data.binarize": "dynamic"},
    {"model.likelihood": "discretized_logistic", "model.gaussian_variance": "learned", "model.gaussian_std": 0.1},
    {"model.likelihood": "gaussian", "model.conditioning": "none"},
])
def test_a_mixed_likelihood_architectures_study_compares_one_quantity(study):
    # The presets mix Bernoulli, Gaussian and discretized likelihoods, and conditional with
    # unconditional models: trials ranked on one number must share the likelihood and conditioning.
    base = with_overrides(BASE, study)
    own_likelihoods = {preset_config(name).model.likelihood for name in preset_names()}
    assert len(own_likelihoods) >= 3
    kinds, conditional, presets = set(), set(), set()
    for trial, config in sampled_configs("architectures", 40, base):
        presets.add(trial.params["preset"])
        kinds.add(likelihood_kind(config.model.likelihood, config.data.binarize))
        conditional.add(config.model.conditional)
        assert tuple(getattr(config.model, k) for k in LIKELIHOOD_KEYS) == tuple(
            getattr(base.model, k) for k in LIKELIHOOD_KEYS)
    assert kinds == {likelihood_kind(base.model.likelihood, base.data.binarize)}
    assert conditional == {base.model.conditional}
    assert len(presets) > 1
    # Every preset of the study's conditioning is offered, the others never.
    assert set(comparable_presets(base)) == {n for n in preset_names()
                                             if preset_config(n).model.conditional == base.model.conditional}


def test_architectures_space_reads_the_preset_names_at_call_time(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-latent", {"model.latent_dim": 3, "optim.epochs": 99})
    configs = [config for trial, config in sampled_configs("architectures", 60) if trial.params["preset"] == "tiny-latent"]
    assert configs, "a preset added after import must be offered"
    assert all(c.model.latent_dim == 3 and c.optim.epochs == 3 for c in configs)


def test_optimiser_space_keeps_the_structure_so_that_every_trial_fuses():
    from pipelines.training.fused import fusion_refusal_for, structure_key

    configs = [config for _, config in sampled_configs("optimiser", 30)]
    assert {structure_key(c) for c in configs} == {structure_key(BASE)}, "a drawn value changed a tensor shape"
    assert all(fusion_refusal_for(c) is None for c in configs)
    assert len({(c.optim.lr, c.objective.kl_weight, c.objective.warmup_epochs, c.objective.free_bits)
                for c in configs}) == 30
    assert all(1e-4 <= c.optim.lr <= 1e-2 and 0.1 <= c.objective.kl_weight <= 4.0 and
               0 <= c.objective.warmup_epochs <= 1.5 and 0 <= c.objective.free_bits <= 0.5 for c in configs)


def test_smoke_space_is_a_tiny_mlp():
    for _, config in sampled_configs("smoke", 20):
        assert config.model.arch == "mlp" and max(config.model.hidden) <= 64 and config.model.latent_dim <= 8


def test_a_space_can_be_loaded_from_a_file(tmp_path):
    path = tmp_path / "my_space.py"
    path.write_text("def tiny(trial, base):\n"
                    "    return {'model.latent_dim': trial.suggest_int('z', 3, 5)}\n")
    trial, config = next(sampled_configs(f"{path}:tiny", 1))
    assert 3 <= config.model.latent_dim <= 5 and trial.params["z"] == config.model.latent_dim


@pytest.mark.parametrize("spec, expected", [
    ("nonexistent", "choose one of: default, architectures, optimiser, smoke"),
    ("/no/such/file.py:space", "no file"),
])
def test_an_unknown_space_names_the_choices(spec, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_space(spec)
    assert "space=" in str(info.value)


def test_a_missing_function_lists_those_defined(tmp_path):
    path = tmp_path / "spaces.py"
    path.write_text("def mine(trial, base):\n    return {}\n")
    with pytest.raises(ConfigError, match=r"no function 'other' \(functions there: mine\)"):
        resolve_space(f"{path}:other")
