"""docs/configuration.md's field table and the flags' --help say what the configuration's fields are."""
import argparse
import logging

from pipelines.config import RunConfig, field_index, with_overrides
from pipelines.config_cli import add_config_arguments, documented_fields
from pipelines.config_docs import BEGIN, DOC, END, REGENERATE, main, with_table


def table_rows(text: str) -> dict[str, list[str]]:
    """Field -> its cells (default, accepted, meaning), read from the table between the markers."""
    table = text[text.index(BEGIN):text.index(END)]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return {cells[0].strip(" `"): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_the_document_is_what_the_code_generates():
    text = DOC.read_text()
    assert text == with_table(text), (
        f"{DOC.relative_to(DOC.parents[1])} differs from the configuration's fields; regenerate it with `{REGENERATE}`")


def test_every_field_says_what_it_means():
    silent = [doc.key for doc in documented_fields() if not doc.help.strip()]
    assert not silent, (f"{', '.join(silent)}: declare the field with described(default, help, choices) "
                        f"(cvae.config) and run `{REGENERATE}`")


def test_the_table_has_a_row_per_field_with_its_real_default():
    rows = table_rows(DOC.read_text())
    fields = {"preset"} | {f"{section}.{name}" for section, name, _ in field_index().values()}
    assert set(rows) == fields
    for key, (default, _, _) in rows.items():
        shown = "" if default == "(empty)" else default.strip("`")
        # The default as written in the table, given as a flag, changes nothing.
        assert with_overrides(RunConfig(), {key: shown}) == RunConfig(), key


def test_the_accepted_values_are_the_ones_validation_admits():
    for doc in documented_fields():
        for choice in doc.choices:
            if doc.key in ("execution.device", "preset"):
                continue  # cuda:N stands for every GPU index; presets are checked by name in test_config
            with_overrides(RunConfig(), {doc.key: choice})  # raises when validation disagrees


def test_each_flag_help_is_the_fields_description():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for doc in documented_fields():
        flag = "--" + doc.key.split(".")[-1].replace("_", "-")
        assert doc.help in parser._option_string_actions[flag].help, flag


def test_check_fails_on_a_stale_document_and_write_repairs_it(tmp_path, caplog):
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text().replace("| `model.latent_dim` | `16` |", "| `model.latent_dim` | `8` |"))
    with caplog.at_level(logging.ERROR):
        assert main(["--check", "--file", str(stale)]) == 1
    assert REGENERATE in caplog.text
    assert main(["--write", "--file", str(stale)]) == 0
    assert stale.read_text() == DOC.read_text()
    assert main(["--check", "--file", str(stale)]) == 0


def test_a_document_without_the_markers_is_refused(tmp_path, caplog):
    unmarked = tmp_path / "configuration.md"
    unmarked.write_text("# Configuration\n")
    with caplog.at_level(logging.ERROR):
        assert main(["--write", "--file", str(unmarked)]) == 2
    assert "markers" in caplog.text and unmarked.read_text() == "# Configuration\n"
