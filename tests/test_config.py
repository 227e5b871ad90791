"""Config loading, overrides and every bad input of issue 3, through the real CLI."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mcis_cli.cli import app
from mcis_cli.config import Config, load_config, unset_keys
from mcis_cli.errors import McisError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
runner = CliRunner()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_official_values_in_voc_config():
    cfg = load_config(REPO / "configs/voc12_vgg16.yaml")
    assert cfg.classify.lr_mult == [1.0, 2.0, 10.0, 20.0]
    assert cfg.classify.decay_epochs == [5, 10] and cfg.classify.checkpoint_epoch == 10
    assert (cfg.pseudolabel.att_thr, cfg.pseudolabel.fg_thr, cfg.pseudolabel.conflict) == (0.95, 0.3, 0.99)
    assert (cfg.segment.batch_size, cfg.segment.crop, cfg.segment.iters) == (10, 321, 15000)
    assert cfg.evaluate.crf_params.iters == 1 and cfg.evaluate.crf_params.bi_srgb == 4


@pytest.mark.parametrize("name", ["voc12_vgg16", "voc12_resnet101", "voc12_vgg16_extra", "voc12_vgg16_web"])
def test_voc_configs_take_the_caffe_segmentation_recipe(name):
    cfg = load_config(REPO / f"configs/{name}.yaml")
    assert cfg.segment.scales == [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3] and cfg.segment.loss_norm == "images"
    assert (cfg.evaluate.upsample, cfg.evaluate.window) == ("official", 401) and cfg.segment.weights is None


@pytest.mark.parametrize("name", ["toy", "toy_extra", "toy_web"])
def test_toy_configs_keep_their_measured_segmentation_settings(name):
    cfg = load_config(REPO / f"configs/{name}.yaml")
    assert (cfg.segment.scales, cfg.segment.scale_range, cfg.segment.loss_norm) == ([], [0.7, 1.3], "pixels")
    assert (cfg.evaluate.upsample, cfg.evaluate.window) == ("bilinear", 0)


def test_official_recipe_keeps_the_paper_architecture_and_optimiser():
    cfg = load_config(REPO / "configs/voc12_vgg16.yaml")
    c = cfg.classify
    assert (c.batch_norm, c.blocks, c.affinity, c.optimizer, c.nesterov) == (False, 5, "bilinear", "sgd", True)
    assert (cfg.segment.batch_norm, cfg.segment.blocks) == (False, 5)


def test_base_chain_merges_sections_and_refuses_loops(tmp_path):
    official = REPO / "configs" / "voc12_vgg16.yaml"
    (tmp_path / "a.yaml").write_text(f"base: {official}\nname: a\nseed: 3\nclassify: {{epochs: 4, lr: 0.5}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nclassify: {epochs: 9}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\nname: c\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["classify.lr=0.25"])
    assert (cfg.name, cfg.seed, cfg.classify.epochs, cfg.classify.lr) == ("c", 3, 9, 0.25)
    assert cfg.classify.batch_size == Config().classify.batch_size  # untouched keys: defaults
    (tmp_path / "a.yaml").write_text("base: sub/c.yaml\nname: a\n")
    with pytest.raises(McisError, match="includes itself"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\nname: d\n")
    with pytest.raises(McisError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "d.yaml")


def test_a_partial_config_without_base_is_refused_in_one_line(tmp_path):
    partial = tmp_path / "mine.yaml"
    partial.write_text("classify: {epochs: 1}\n")
    with pytest.raises(McisError, match=r"mine.yaml has no `base:` and leaves \d+ keys unset .*base: toy.yaml"):
        load_config(partial)
    result = CliRunner().invoke(app, ["config", "show", "--config", str(partial)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    partial.write_text(f"base: {REPO / 'configs' / 'toy.yaml'}\nclassify: {{epochs: 1}}\n")
    cfg = load_config(partial)
    assert (cfg.name, cfg.classify.epochs, cfg.classify.width) == ("toy", 1, 0.125)
    complete = tmp_path / "resolved.yaml"  # what a run logs as config.yaml sets every key
    complete.write_text(cfg.to_yaml())
    assert load_config(complete) == cfg and unset_keys(yaml.safe_load(cfg.to_yaml())) == []


def test_set_overrides_coerce_types(tmp_path):
    cfg = load_config(REPO / "configs/toy.yaml", [
        "classify.lr=0.01", "evaluate.scales=[1.0]", "evaluate.crf=false",
        "classify.loss_weights.contrast=0.5", "data.saliency_dir=sal",
    ])
    assert cfg.classify.lr == 0.01
    assert cfg.evaluate.scales == [1.0] and cfg.evaluate.crf is False
    assert cfg.classify.loss_weights.contrast == 0.5 and cfg.classify.loss_weights.cls == 1.0
    assert cfg.data.saliency_dir == "sal"


def test_flat_params_cover_every_leaf():
    flat = Config().flat()
    assert flat["classify.lr"] == 1e-3
    assert flat["evaluate.crf_params.bi_sxy"] == 80.0
    assert not any(isinstance(v, dict) for v in flat.values())


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base: {REPO / 'configs' / 'toy.yaml'}\n{text}")
    return path


@pytest.mark.parametrize(
    ("text", "sets", "needle"),
    [
        ("classify:\n  lrr: 0.1\n", [], "unknown config key 'classify.lrr'"),
        ("name: x\n", ["classify.nope=1"], "unknown config key in --set: 'classify.nope'"),
        ("name: x\n", ["nosection.lr=1"], "unknown config key in --set: 'nosection.lr'"),
        ("classify:\n  epochs: many\n", [], "invalid value for 'classify.epochs'"),
        ("name: x\n", ["classify.lr=abc"], "invalid value for 'classify.lr' in --set"),
        ("name: x\nclassify: [1, 2\n", [], "YAML syntax error"),
        ("name: x\n", ["classify.lr"], "--set expects key=value"),
        ("name: x\n", ["segment.weights=w.pth", "segment.pretrained=false"], "set segment.pretrained=true"),
        ("name: x\n", ["segment.arch=resnet101"], "resnet101 trains from ImageNet weights only"),
        ("name: x\n", ["segment.scales=[1.0, 0]"], "scale factors must be > 0"),
        ("name: x\n", ["segment.scale_range=[1.3, 0.7]"], "must be the low then the high scale"),
        ("name: x\n", ["segment.loss_norm=batch"], "invalid value for 'segment.loss_norm'"),
        ("name: x\n", ["evaluate.upsample=nearest"], "invalid value for 'evaluate.upsample'"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, text, sets, needle):
    path = _write(tmp_path, text)
    args = ["config", "show", "--config", str(path)]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_yaml_error_names_the_line(tmp_path):
    path = _write(tmp_path, "name: x\nclassify:\n  lr: [0.1\n")
    with pytest.raises(McisError, match=r"line \d+"):
        load_config(path)


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["config", "show", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "config file not found" in result.output


def test_config_show_prints_merged_yaml():
    result = runner.invoke(app, ["config", "show", "--set", "classify.lr=0.01"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["classify"]["lr"] == 0.01
    assert shown["name"] == "toy"


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "classify", "localize", "pseudolabel", "segment", "evaluate",
                    "export", "predict", "pipeline", "ui", "config"):
        assert command in result.stdout
    data_help = runner.invoke(app, ["data", "--help"])
    assert "synth" in data_help.stdout and "check" in data_help.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("mcis ")
