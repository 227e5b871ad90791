"""Watched-folder segmentation: the `serve-inbox` service of docker-compose.yml.

Images dropped into --inbox are segmented by `mcis predict`'s code with the ONNX model (fetched
once from the registry, with its provider settings, when --model is a models:/ URI), masks and
overlays are written to --outbox, and each image is moved to <inbox>/done, or to <inbox>/failed
with the reason printed. With --heartbeat FILE, the file is touched at every scan: the compose
healthcheck reads its age.

    python deploy/serve.py --model models:/mcis-deeplab@champion --inbox in/ --outbox out/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mcis_cli import predict, tracking
from mcis_cli.errors import McisError
from mcis_cli.serving import read_metadata

SETTLE_SECONDS = 2.0  # a file modified more recently may still be being copied in


def pending(inbox: Path) -> list[Path]:
    now = time.time()
    return sorted(
        path for path in inbox.iterdir()
        if path.is_file() and path.suffix.lower() in predict.IMAGE_SUFFIXES
        and now - path.stat().st_mtime >= SETTLE_SECONDS
    )


def move(paths: list[Path], folder: Path) -> None:
    if not paths:
        return
    folder.mkdir(exist_ok=True)
    for path in paths:
        path.replace(folder / path.name)


def process(model: Path, batch: list[Path], outbox: Path, provider: str, settings: dict | None) -> None:
    """Segment a batch; images that cannot be read go to failed/ with the reason printed."""
    try:
        result = predict.predict_files(model, [str(p) for p in batch], outbox, provider=provider,
                                       settings=settings)
    except McisError as exc:  # no image of the batch could be read
        print(f"failed: {exc}", file=sys.stderr, flush=True)
        move(batch, batch[0].parent / "failed")
        return
    print(result, flush=True)
    for reason in result.failed.values():
        print(f"failed: {reason}", file=sys.stderr, flush=True)
    for folder, keep in (("done", False), ("failed", True)):
        move([p for p in batch if (p.resolve() in result.failed) == keep], batch[0].parent / folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.onnx or models:/mcis-deeplab@champion")
    parser.add_argument("--inbox", type=Path, required=True)
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between folder scans")
    parser.add_argument("--once", action="store_true", help="process what is there, then exit")
    parser.add_argument("--heartbeat", type=Path, help="file touched at every scan (for a healthcheck)")
    args = parser.parse_args(argv)
    try:
        model, settings = (tracking.download_model(args.model) if args.model.startswith("models:/")
                           else (Path(args.model), None))
        read_metadata(model)  # a bad model is an error here, not a failure of every image
        args.inbox.mkdir(parents=True, exist_ok=True)
        print(f"watching {args.inbox} with {args.model} ({model}); results in {args.outbox}", flush=True)
        while True:
            if args.heartbeat:
                args.heartbeat.touch()
            batch = pending(args.inbox)
            if batch:
                process(model, batch, args.outbox, args.provider, settings)
            if args.once:
                return 0
            time.sleep(args.interval)
    except McisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
