"""The command line as documented: README's command list and `--help` agree, flags take no value,
and a command run outside the checkout says how to pass --config and leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from mcis_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def app_commands() -> dict[str, object]:
    """'data synth' -> its command object, for every leaf command of the Typer app."""
    found, todo = {}, [("", typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        if hasattr(command, "commands"):
            todo += [(f"{path} {name}".strip(), sub) for name, sub in command.commands.items()]
        else:
            found[path] = command
    return found


def shown_help(*args: str) -> str:
    """`mcis ARGS --help` as one line: the box and the wrapping gone."""
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return re.sub(r"[│\s]+", " ", result.output)


def long_options(command) -> set[str]:
    return {o for p in command.params if p.param_type_name == "option"
            for o in (*p.opts, *p.secondary_opts) if o.startswith("--") and o != "--help"}


def readme_commands() -> dict[str, set[str]]:
    """The README's `## Commands` code block: command -> the long options its line(s) list.
    A line starting with `mcis` opens a command; indented lines continue it; `#` starts a comment."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Commands\n+```bash\n(.*?)^```", text, re.S | re.M).group(1)
    listed: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        code = line.split("#", 1)[0].rstrip()
        if code.startswith("mcis "):
            words = code.split()[1:]
            name = []
            while words and re.fullmatch(r"[a-z]+", words[0]):
                name.append(words.pop(0))
            current = listed.setdefault(" ".join(name), set())
        elif not code.strip():
            continue
        assert current is not None, f"README line outside a command: {line!r}"
        current |= set(re.findall(r"--[a-z][a-z0-9-]*", code))
    return listed


def test_readme_lists_every_command_with_exactly_its_options():
    documented, actual = readme_commands(), app_commands()
    assert set(documented) == set(actual), "README ## Commands and the app list different commands"
    for name, command in actual.items():
        assert documented[name] == long_options(command), f"mcis {name}: README vs --help"


def test_readme_parser_reads_options_flags_and_subcommands():
    """Guards the test above against a parser that reads nothing."""
    documented = readme_commands()
    assert {"--crf", "--no-crf", "--save"} <= documented["evaluate"]
    assert documented["data synth"] >= {"--force", "--n-extra"} and "--config" not in documented["ui"]


@pytest.mark.parametrize("name", sorted(app_commands()))
def test_help_shows_no_value_for_flags_and_a_set_example_of_the_commands_section(name):
    shown = shown_help(*name.split())
    assert "<bool>" not in shown  # a flag takes no value: `--force`, not `--force true`
    if "--set" in long_options(app_commands()[name]):
        example = re.search(r"--set ([a-z_]+)\.[a-z_]+=", shown).group(1)
        section = {"config show": "data", "pipeline": "segment", "psa classify": "psa", "psa cam": "psa"}.get(name, name)
        assert example == section, f"mcis {name} --help shows --set {example}.*"


def test_export_help_shows_where_the_model_goes_by_default():
    assert "[default: (<output_dir>/<run id>/model.onnx)]" in shown_help("export")


def test_flags_take_no_value(tmp_path):
    args = ["data", "synth", "--out", str(tmp_path / "toy"), "--n-train", "2", "--n-val", "1", "--size", "32"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0  # replaces it
    refused = runner.invoke(app, [*args, "--force", "true"])
    assert refused.exit_code == 2 and "true" in refused.output


@pytest.mark.parametrize("command", ["classify", "localize", "segment", "evaluate", "export", "pipeline"])
def test_outside_the_checkout_the_default_config_is_explained_and_no_store_is_made(
        command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, [command])
    assert result.exit_code == 2, result.output
    assert "config file not found: configs/toy.yaml" in result.output
    assert "relative to the current folder" in result.output and "--config PATH" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["localize"], ["segment"], ["export"], ["localize", "--from-run", "abc"]])
def test_a_lookup_in_a_folder_without_a_store_fails_without_creating_one(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, [*args, "--config", str(ROOT / "configs" / "toy.yaml")])
    assert result.exit_code == 2, result.output
    assert f"no tracking store at {tmp_path / 'mlflow.db'}" in result.output
    assert "MLFLOW_TRACKING_URI" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
