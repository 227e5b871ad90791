"""The `mcis` command line: parses options, loads the config, calls a stage, prints a summary."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mcis_cli import __version__
from mcis_cli.config import DEFAULT_CONFIG, load_config
from mcis_cli.errors import McisError
from mcis_cli.progress import console as err
from mcis_cli.progress import out

_value_type = typer.core.TyperOption.display_type_rich


def _flag_type(option: typer.core.TyperOption, ctx) -> str | None:
    """A flag takes no value, so its help shows none: typer's `<bool>` reads as `--force true`."""
    return None if option.is_flag else _value_type(option, ctx)


typer.core.TyperOption.display_type_rich = _flag_type

app = typer.Typer(
    help="MCIS weakly supervised semantic segmentation, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Build or validate a dataset in the VOC2012 layout.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
psa_app = typer.Typer(help="PSA's classifier and its CAMs (then `affinity`, `refine`).", no_args_is_help=True)
app.add_typer(psa_app, name="psa")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]


def set_option(example: str):
    """`--set`, its help showing a key of the command's own section."""
    return Annotated[list[str], typer.Option(
        "--set", metavar="KEY=VALUE", help=f"Override a config key, e.g. --set {example}")]


FromRunOpt = Annotated[
    str | None,
    typer.Option("--from-run", help="Input run id (default: the method's newest finished run, never a "
                                    "baseline's or the ceiling's)."),
]
ResumeOpt = Annotated[str | None, typer.Option("--resume", help="Continue this interrupted run.")]


def friendly(command):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except McisError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # disk full, unwritable folder, ...: name the file, no traceback
            from mcis_cli.files import describe_os_error

            err.print(f"[bold red]error:[/] {describe_os_error(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _summary(title: str, result) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("run id", result.run_id)
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for key, value in result.outputs.items():
        table.add_row(key, str(value))
    out.print(table)


def _version(value: bool) -> None:
    if value:
        out.print(f"mcis {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """MCIS: classify -> localize -> pseudolabel -> segment -> evaluate -> export."""


# ---- data ---------------------------------------------------------------------------------
@data_app.command("synth")
@friendly
def data_synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (VOC2012 layout).")] = Path(
        "data/toy"
    ),
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images.")] = 320,
    n_val: Annotated[int, typer.Option("--n-val", help="Validation images.")] = 80,
    size: Annotated[int, typer.Option(help="Image side in pixels (toy profile).")] = 96,
    n_extra: Annotated[int, typer.Option("--n-extra", help="Extra single-label images (setting 2).")] = 0,
    n_web: Annotated[int, typer.Option("--n-web", help="Noisy web images (setting 3).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
    profile: Annotated[str, typer.Option(
        help="toy: the embedded dataset; voc: shaped as VOC 2012 (20 classes, VOC sizes, saliency_aug/) "
             "for the voc12 configs.")] = "toy",
) -> None:
    """Write the embedded dataset: deterministic for a seed."""
    from mcis_cli.data import synth

    report = synth.write(out_dir, seed=seed, n_train=n_train, n_val=n_val, size=size, n_extra=n_extra,
                         n_web=n_web, force=force, profile=profile)
    out.print(f"wrote {report['images']} images to {out_dir}")


@data_app.command("check")
@friendly
def data_check(
    root: Annotated[Path, typer.Option("--root", help="The VOC2012 folder to validate.")],
    write_labels: Annotated[bool, typer.Option(
        "--write-labels", help="Write train_cls.txt / val_cls.txt from the masks first.")] = False,
) -> None:
    """Validate a VOC-layout tree and print counts and every problem found."""
    from mcis_cli.data import voc

    if write_labels:
        for name, count in voc.derive_labels(root).items():
            out.print(f"wrote {count} label lines to {name}")
    report = voc.check(root)
    voc.print_report(report, out)
    if report.problems:
        raise typer.Exit(1)


# ---- config -------------------------------------------------------------------------------
@config_app.command("show")
@friendly
def config_show(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("data.root=data/voc") = []) -> None:  # noqa: B006
    """Print the resolved config as YAML."""
    out.print(load_config(config, sets).to_yaml(), highlight=False, markup=False)


# ---- stages -------------------------------------------------------------------------------
def stage_command(command=None, *, group: typer.Typer = app, name: str | None = None):
    """A stage's command (in `group`, as `name`): it returns the stage's result, printed as a
    summary table (by rank 0 alone under torchrun). The stage module is imported only when its
    command runs, so `mcis --help` does not load torch."""
    if command is None:
        return functools.partial(stage_command, group=group, name=name)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        result = command(*args, **kwargs)
        from mcis_cli import distributed  # torch is loaded by now: the stage has run

        if distributed.is_main():
            _summary(command.__name__, result)

    return group.command(name)(friendly(wrapper))


def _stage(name: str):
    return importlib.import_module(f"mcis_cli.stages.{name}")


@stage_command
def classify(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("classify.lr=0.01") = [],  # noqa: B006
             resume: ResumeOpt = None):
    """Train the co-attention classifier on same-class image pairs."""
    return _stage("classify").run(load_config(config, sets), resume=resume)


@stage_command
def localize(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("localize.partners=5") = [],  # noqa: B006
             from_run: FromRunOpt = None, resume: ResumeOpt = None):
    """Cross-image localization maps for every training image."""
    return _stage("localize").run(load_config(config, sets), from_run=from_run, resume=resume)


@stage_command
def accumulate(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("accumulate.epochs=15") = [],  # noqa: B006
               resume: ResumeOpt = None):
    """OAA: train its classifier while accumulating its attention maps; write them as maps."""
    return _stage("accumulate").run(load_config(config, sets), resume=resume)


@stage_command
def integral(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("integral.epochs=15") = [],  # noqa: B006
             from_run: FromRunOpt = None, resume: ResumeOpt = None):
    """OAA+: train the integral attention model on an accumulate run's maps; write its maps."""
    return _stage("integral").run(load_config(config, sets), from_run=from_run, resume=resume)


@stage_command
def pseudolabel(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("pseudolabel.fg_thr=0.4") = [],  # noqa: B006
                from_run: FromRunOpt = None, resume: ResumeOpt = None):
    """Pseudo masks from localization maps and a background cue."""
    return _stage("pseudolabel").run(load_config(config, sets), from_run=from_run, resume=resume)


# ---- PSA ----------------------------------------------------------------------------------
@stage_command(group=psa_app, name="classify")
def psa_classify(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("psa.lr=0.05") = [],  # noqa: B006
                 resume: ResumeOpt = None):
    """Train PSA's classifier (VGG16 variant, CAM head)."""
    return _stage("psa_classify").run(load_config(config, sets), resume=resume)


@stage_command(group=psa_app, name="cam")
def psa_cam(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("psa.cam_scales=[1.0]") = [],  # noqa: B006
            from_run: FromRunOpt = None, resume: ResumeOpt = None):
    """PSA's multi-scale CAMs of every training image."""
    return _stage("psa_cam").run(load_config(config, sets), from_run=from_run, resume=resume)


@stage_command
def affinity(config: ConfigOpt = DEFAULT_CONFIG, sets: set_option("affinity.epochs=4") = [],  # noqa: B006
             from_run: FromRunOpt = None, resume: ResumeOpt = None):
    """PSA's confident labels (two CRF passes) and AffinityNet trained on them."""
    return _stage("affinity").run(load_config(config, sets), from_run=from_run, resume=resume)


@stage_command
def refine(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: set_option("refine.beta=8") = [],  # noqa: B006
    from_run: FromRunOpt = None,
    affinity_run: Annotated[str | None, typer.Option(
        "--affinity-run", help="The affinity run whose AffinityNet walks (default: the newest).")] = None,
    resume: ResumeOpt = None,
):
    """The random walk on any maps run's maps (PSA's CAMs, CAM, MCIS, ...)."""
    return _stage("refine").run(load_config(config, sets), from_run=from_run, affinity_run=affinity_run,
                                resume=resume)


@stage_command
def segment(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: set_option("segment.iters=3000") = [],  # noqa: B006
    from_run: FromRunOpt = None,
    labels: Annotated[str, typer.Option(help="pseudo (the method) or gt (the ceiling).")] = "pseudo",
    resume: ResumeOpt = None,
):
    """Train DeepLab-LargeFOV on the pseudo masks (poly schedule)."""
    if labels not in ("pseudo", "gt"):
        raise McisError(f"--labels must be 'pseudo' or 'gt', got {labels!r}")
    return _stage("segment").run(load_config(config, sets), from_run=from_run, labels=labels, resume=resume)


@stage_command
def evaluate(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: set_option("evaluate.scales=[1.0]") = [],  # noqa: B006
    from_run: FromRunOpt = None,
    split: Annotated[str | None, typer.Option(help="Split to score (default: by stage).")] = None,
    crf: Annotated[bool | None, typer.Option("--crf/--no-crf", help="Dense CRF on top (default: evaluate.crf).")] = None,
    save: Annotated[bool, typer.Option("--save", help="Write predicted masks as PNGs.")] = False,
    resume: ResumeOpt = None,
):
    """Score any stage's output: maps, pseudo masks or the segmentation model."""
    cfg = load_config(config, sets)
    if crf is not None:
        cfg.evaluate.crf = crf
    if save:
        cfg.evaluate.save_masks = True
    return _stage("evaluate").run(cfg, from_run=from_run, split=split, resume=resume)


@stage_command
def export(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: set_option("export.opset=17") = [],  # noqa: B006
    from_run: FromRunOpt = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the .onnx file.", show_default="<output_dir>/<run id>/model.onnx")] = None,
    ceiling: Annotated[bool, typer.Option(
        "--ceiling", help="Allow exporting the fully supervised ceiling (a --labels gt run).")] = False,
    resume: ResumeOpt = None,
):
    """Export the segmentation model to ONNX, check parity, register it."""
    return _stage("export").run(load_config(config, sets), from_run=from_run, out=out_path, ceiling=ceiling,
                                resume=resume)


@app.command()
@friendly
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    model: Annotated[str, typer.Option("--model", help="model.onnx, or models:/mcis-deeplab@champion (or /<version>).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("predictions"),
    provider: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Segment new images with ONNX Runtime (no PyTorch needed at serving time); masks at each
    image's displayed size (EXIF orientation applied)."""
    from mcis_cli.predict import predict_files

    if provider not in ("auto", "cpu", "cuda"):
        raise McisError(f"--provider must be auto, cpu or cuda, got {provider!r}")
    result = predict_files(model, images, out_dir, provider=provider)
    out.print(str(result), highlight=False)
    for reason in result.failed.values():
        err.print(f"[bold red]error:[/] {reason}", highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(2)


@app.command()
@friendly
def promote(
    version: Annotated[str, typer.Argument(metavar="VERSION", help="Version number, or an alias such as challenger.")],
    name: Annotated[str, typer.Option("--name", help="Registered model name (export.model_name).")] = "mcis-deeplab",
    allow_baseline: Annotated[bool, typer.Option(
        "--allow-baseline", help="Allow a version that is not the method's (baseline, ceiling, ablation).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Allow a version without a miou tag, or scoring below the champion.")] = False,
) -> None:
    """Point NAME@champion, the version serving follows, at VERSION after checking its role and mIoU."""
    from mcis_cli import tracking

    result = tracking.promote(version, name, allow_baseline=allow_baseline, force=force)
    out.print(str(result), highlight=False, soft_wrap=True)


@app.command()
@friendly
def pipeline(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: set_option("segment.iters=3000") = [],  # noqa: B006
    ablation: Annotated[bool, typer.Option("--ablation", help="Also run the component ablation.")] = False,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", metavar="K,K,...",
        help="Run the whole pipeline once per embedded-data seed (data.synth.seed=K, data at "
             "<data.root>-seedK) under one `seeds` parent run; report each seed and mean ± std.")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", metavar="A,B,...",
        help="Compare these methods (cam, mcis, ...): each one's chain to its maps, then the same "
             "pseudolabel, segment and evaluate steps, in one parent run with a per-method table.")] = None,
) -> None:
    """Every stage in order under one parent MLflow run, then the results table."""
    from mcis_cli import methods as known
    from mcis_cli import pipeline as driver

    cfg = load_config(config, sets)
    if methods is not None:
        cfg = cfg.replace(pipeline={"methods": known.parse(methods)})
    if ablation and cfg.pipeline.methods:
        raise McisError("--ablation and --methods together: the ablation varies MCIS alone; run it without --methods")
    if seeds is None:
        driver.run(cfg, ablation=ablation)
        return
    if ablation:
        raise McisError("--ablation and --seeds together: run the ablation on one data seed "
                        "(--set data.synth.seed=K --set data.root=DIR)")
    driver.run_seeds(cfg, driver.parse_seeds(seeds))


@app.command()
@friendly
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address; anything but loopback needs --expose.")] = "127.0.0.1",
    expose: Annotated[bool, typer.Option("--expose", help="Allow binding a non-loopback address.")] = False,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
) -> None:
    """Serve the MLflow UI over the same store the commands use."""
    from mcis_cli import ui as server

    server.serve(host=host, port=port, expose=expose, workers=workers, console=out)


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    app(prog_name="mcis")


if __name__ == "__main__":
    sys.exit(main())
