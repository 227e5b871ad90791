"""PASCAL VOC 2012 (+ SBD) in its standard layout, and every tree written in that layout.

root/JPEGImages/<id>.jpg, root/SegmentationClassAug/<id>.png (0 bg, 1..K, 255 ignore),
root/ImageSets/Segmentation/<list>.txt (one id a line) and image-level labels in
ImageSets/Segmentation/{train_cls,val_cls}.txt (`<id> <c> <c> ...`, 0-based, VOC order).
Extra lists for the paper's settings 2/3 are `<file> <class> ...` lines, 1-based as the official
code, file paths relative to root.

Training reads images and image-level labels only (train_samples). Masks are reached through
mask_path / load_mask, which only evaluation and `segment --labels gt` call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mcis_cli.config import DataCfg
from mcis_cli.data.transforms import IGNORE, probe_image, read_index_png
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
IMAGES = "JPEGImages"
MASKS = "SegmentationClassAug"
PARTS = "SegmentationPart"  # embedded data only: 0 background, 1 object body, 2 its class's part
LISTS = "ImageSets/Segmentation"
CLS_FILES = ("train_cls.txt", "val_cls.txt")
REPORT_LIMIT = 50  # problems printed by print_report; the report keeps all of them


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    labels: tuple[int, ...]  # 0-based foreground classes


# ---- parsing: each helper raises McisError("file:line: ..."), or appends it to `problems` ----
def _lines(path: Path) -> Iterator[tuple[str, list[str]]]:
    """("file:line", fields) for every non-blank line; CRLF and trailing spaces are fine."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise McisError(f"list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise McisError(f"cannot read list file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if fields := line.split():
            yield f"{path}:{number}", fields


def _safe_id(image_id: str, where: str) -> str:
    if "/" in image_id or "\\" in image_id or ".." in image_id or "\0" in image_id:
        raise McisError(f"{where}: unsafe image id {image_id!r} (an id is a bare file stem)")
    return image_id


def _inside(path: Path, root: str | Path, where: str) -> Path:
    """`path` if it stays inside the dataset root once symlinks are resolved, else McisError."""
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise McisError(f"{where}: {path} resolves outside {root}; keep every file inside the dataset")
    return path


def _list_file(root: Path, name: str) -> Path:
    """ImageSets/Segmentation/<name>.txt, refused if it (or a folder above it) links out of root."""
    return _inside(root / LISTS / f"{name}.txt", root, "list file")


def _image_file(path: Path, folder: Path, where: str) -> Path:
    """`path` if it is a file inside `folder` once symlinks are resolved, else McisError."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise McisError(
            f"{where}: {path} resolves outside {folder}; keep every file inside the dataset"
        )
    if not path.is_file():
        raise McisError(f"{where}: image {path} not found")
    return path


def _classes(fields: list[str], where: str, k: int, base: int) -> tuple[int, ...]:
    out = set()
    for text in fields:
        try:
            value = int(text)
        except ValueError:
            raise McisError(f"{where}: class id {text!r} is not an integer") from None
        if not base <= value < k + base:
            raise McisError(f"{where}: class id {value} out of range {base}..{k - 1 + base}")
        out.add(value - base)
    return tuple(sorted(out))


def _collect(problems: list[str] | None, exc: McisError) -> None:
    if problems is None:
        raise exc
    problems.append(str(exc))


def _require_root(root: Path) -> Path:
    if not root.is_dir():
        raise McisError(
            f"dataset root not found: {root} (write the embedded one with `mcis data synth --out {root}`"
            " or set data.root to your VOC2012 folder)"
        )
    return root


def class_names(root: str | Path) -> list[str]:
    """root/classes.txt (one name a line) if present, else the 20 VOC classes."""
    path = _inside(Path(root) / "classes.txt", root, "class names")
    if not path.is_file():
        return list(VOC_CLASSES)
    names = [fields[0] for _, fields in _lines(path)]
    if not names or len(set(names)) != len(names):
        raise McisError(f"{path}: needs one unique class name a line")
    return names


def _read_cls(path: Path, k: int, problems: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    labels = {}
    for where, fields in _lines(path):
        try:
            labels[_safe_id(fields[0], where)] = _classes(fields[1:], where, k, base=0)
        except McisError as exc:
            _collect(problems, exc)
    return labels


def read_labels(root: str | Path) -> dict[str, tuple[int, ...]]:
    """id -> 0-based labels, train_cls.txt and val_cls.txt merged."""
    root = Path(root)
    k = len(class_names(root))
    paths = [_inside(root / LISTS / name, root, "labels") for name in CLS_FILES
             if (root / LISTS / name).is_file()]
    if not paths:
        raise McisError(
            f"no image-level labels in {root / LISTS} ({' / '.join(CLS_FILES)} missing); derive them "
            f"from the masks once with: mcis data check --root {root} --write-labels"
        )
    return {key: value for path in paths for key, value in _read_cls(path, k).items()}


def _read_ids(path: Path, problems: list[str] | None = None) -> list[tuple[str, str]]:
    """[(where, id)] of an id list; duplicates are refused."""
    out, seen = [], set()
    for where, fields in _lines(path):
        try:
            image_id = _safe_id(fields[0], where)
            if len(fields) != 1:
                raise McisError(f"{where}: expected one image id, got {len(fields)} fields")
            if image_id in seen:
                raise McisError(f"{where}: duplicate id {image_id}")
        except McisError as exc:
            _collect(problems, exc)
            continue
        seen.add(image_id)
        out.append((where, image_id))
    return out


def _read_extra(
    root: Path, name: str, k: int, problems: list[str] | None = None
) -> list[tuple[str, Sample]]:
    """[(where, Sample)] of a `<file> <class> ...` list whose images exist; id `<name>_<stem>`."""
    out, seen = [], set()
    for where, fields in _lines(_list_file(root, name)):
        try:
            if len(fields) < 2:
                raise McisError(f"{where}: expected `<file> <class> ...` (1-based classes)")
            relative = Path(fields[0])
            if relative.is_absolute():
                raise McisError(f"{where}: absolute path {relative}; list files relative to {root}")
            image = _image_file(root / relative, root, where)
            image_id = f"{name}_{_safe_id(image.stem, where)}"
            if image_id in seen:
                raise McisError(
                    f"{where}: duplicate id {image_id} (two files share the stem {image.stem})"
                )
            labels = _classes(fields[1:], where, k, base=1)
        except McisError as exc:
            _collect(problems, exc)
            continue
        seen.add(image_id)
        out.append((where, Sample(image_id, image, labels)))
    return out


# ---- the training / evaluation API -----------------------------------------------------
def _split(root: Path, list_name: str, labels: dict[str, tuple[int, ...]]) -> list[Sample]:
    samples = []
    for where, image_id in _read_ids(_list_file(root, list_name)):
        image = _image_file(root / IMAGES / f"{image_id}.jpg", root / IMAGES, where)
        if image_id not in labels:
            raise McisError(f"{where}: {image_id} has no line in {' / '.join(CLS_FILES)}")
        samples.append(Sample(image_id, image, labels[image_id]))
    return samples


def split_samples(root: str | Path, list_name: str) -> list[Sample]:
    """The images of ImageSets/Segmentation/<list_name>.txt with their image-level labels."""
    root = _require_root(Path(root))
    return _split(root, list_name, read_labels(root))


def train_samples(data_cfg: DataCfg) -> list[Sample]:
    """The training list plus the extra lists (settings 2/3). Images and labels only: no mask is read."""
    root = _require_root(Path(data_cfg.root))
    samples = _split(root, data_cfg.train_list, read_labels(root))
    k = len(class_names(root))
    ids = {s.id for s in samples}
    for name in data_cfg.extra_lists:
        for where, sample in _read_extra(root, name, k):
            if sample.id in ids:
                raise McisError(f"{where}: id {sample.id} already used by another list")
            ids.add(sample.id)
            samples.append(sample)
    return samples


def mask_path(root: str | Path, image_id: str) -> Path:
    """Ground-truth mask of an image: for evaluation and `segment --labels gt` only."""
    return _inside(Path(root) / MASKS / f"{_safe_id(image_id, 'mask')}.png", root, "mask")


def load_mask(root: str | Path, image_id: str) -> np.ndarray:
    """uint8 HxW: 0 background, 1..K classes, 255 ignore. Evaluation and `segment --labels gt` only."""
    return read_index_png(mask_path(root, image_id))


def load_parts(root: str | Path, image_id: str) -> np.ndarray | None:
    """The part map of an embedded image (None for trees without one): to measure where
    localization maps fall within objects, evaluation only."""
    path = _inside(Path(root) / PARTS / f"{_safe_id(image_id, 'part map')}.png", root, "part map")
    return read_index_png(path) if path.is_file() else None


def saliency_path(root: str | Path, saliency_dir: str, image_id: str) -> Path:
    return _inside(Path(root) / saliency_dir / f"{_safe_id(image_id, 'saliency')}.png", root, "saliency")


def _read_mask(path: Path, k: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """A mask and the 0-based classes it holds; values outside 0..K and 255 are refused."""
    mask = read_index_png(path)
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in values if v > k and v != IGNORE]
    if bad:
        raise McisError(f"{path}: mask values {bad[:5]} outside 0..{k} and {IGNORE}")
    return mask, tuple(int(v) - 1 for v in values if 0 < v <= k)


def derive_labels(
    root: str | Path, train_list: str = "train_aug", val_list: str = "val", force: bool = False
) -> dict[str, int]:
    """Write train_cls.txt / val_cls.txt from the masks of the two lists: run once, explicitly.

    The classes present in each mask become the image's labels. Returns lines written per file.
    """
    root = _require_root(Path(root))
    k = len(class_names(root))
    written = {}
    for list_name, cls_name in zip((train_list, val_list), CLS_FILES, strict=True):
        target = root / LISTS / cls_name
        if target.exists() and not force:
            raise McisError(
                f"{target} exists; delete it first to replace it with mask-derived labels"
            )
        lines = []
        for _, image_id in _read_ids(_list_file(root, list_name)):
            labels = _read_mask(mask_path(root, image_id), k)[1]
            lines.append(" ".join([image_id, *map(str, labels)]))
        with atomic_path(target) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in lines))
        written[cls_name] = len(lines)
    return written


# ---- check ------------------------------------------------------------------------------
@dataclass
class SplitCounts:
    images: int = 0
    masks: int = 0
    unlabeled: int = 0  # ids without a labels line or with no foreground class
    per_class: list[int] = field(default_factory=list)  # images holding each class


@dataclass
class CheckReport:
    root: Path
    classes: list[str]
    splits: dict[str, SplitCounts]
    problems: list[str]


def _list_entries(
    root: Path, path: Path, k: int, labels: dict, problems: list[str]
) -> list[Sample]:
    """The samples of any list under ImageSets/Segmentation whose image exists (id or extra list)."""
    first = next(_lines(path), ("", []))[1]
    if len(first) > 1:
        return [sample for _, sample in _read_extra(root, path.stem, k, problems)]
    samples = []
    for where, image_id in _read_ids(path, problems):
        try:
            image = _image_file(root / IMAGES / f"{image_id}.jpg", root / IMAGES, where)
        except McisError as exc:
            problems.append(str(exc))
            continue
        samples.append(Sample(image_id, image, labels.get(image_id, ())))
    return samples


def check(root: str | Path) -> CheckReport:
    """Validate the whole tree in one pass and collect every problem (never stops at the first)."""
    root = _require_root(Path(root))
    problems: list[str] = []
    for sub in (IMAGES, MASKS, LISTS):
        if not (root / sub).is_dir():
            problems.append(f"missing folder {root / sub}")
    try:
        classes = class_names(root)
    except McisError as exc:
        problems.append(str(exc))
        classes = list(VOC_CLASSES)
    k = len(classes)
    labels: dict[str, tuple[int, ...]] = {}
    cls_paths = [root / LISTS / name for name in CLS_FILES if (root / LISTS / name).is_file()]
    for path in cls_paths:
        try:
            labels.update(_read_cls(_inside(path, root, "labels"), k, problems))
        except McisError as exc:
            problems.append(str(exc))
    if not cls_paths:
        problems.append(f"no image-level labels: {' / '.join(CLS_FILES)} missing in {root / LISTS}")

    sizes: dict[Path, tuple[int, int] | None] = {}  # each image is decoded once across lists
    splits = {}
    for path in sorted((root / LISTS).glob("*.txt")):
        if path.name in CLS_FILES:
            continue
        try:
            _inside(path, root, "list file")
        except McisError as exc:
            problems.append(str(exc))
            continue
        counts = splits[path.stem] = SplitCounts(per_class=[0] * k)
        missing_masks = []
        for sample in _list_entries(root, path, k, labels, problems):
            counts.images += 1
            counts.unlabeled += not sample.labels
            for c in sample.labels:
                counts.per_class[c] += 1
            if sample.image not in sizes:
                try:
                    sizes[sample.image] = probe_image(sample.image)
                except McisError as exc:
                    problems.append(str(exc))
                    sizes[sample.image] = None
            try:
                mask = mask_path(root, sample.id)
            except McisError as exc:
                problems.append(str(exc))
                continue
            if not mask.is_file():
                missing_masks.append(sample.id)
                continue
            counts.masks += 1
            try:
                shape = _read_mask(mask, k)[0].shape
            except McisError as exc:
                problems.append(str(exc))
                continue
            if sizes[sample.image] not in (None, shape):
                problems.append(
                    f"{mask}: size {shape} differs from its image {sizes[sample.image]}"
                )
        if counts.masks and missing_masks:
            problems.append(
                f"{path}: {len(missing_masks)} of {counts.images} ids have no mask in {MASKS} "
                f"(first: {missing_masks[0]})"
            )
    return CheckReport(root, classes, splits, problems)


def print_report(report: CheckReport, console: Console) -> None:
    lists = Table(title=f"{report.root}", header_style="bold")
    for column in ("list", "images", "masks", "without labels"):
        lists.add_column(column, justify="left" if column == "list" else "right")
    for name, counts in report.splits.items():
        lists.add_row(name, str(counts.images), str(counts.masks), str(counts.unlabeled))
    console.print(lists)

    per_class = Table(title="images per class", header_style="bold")
    per_class.add_column("class")
    for name in report.splits:
        per_class.add_column(name, justify="right")
    for c, class_name in enumerate(report.classes):
        per_class.add_row(class_name, *(str(s.per_class[c]) for s in report.splits.values()))
    console.print(per_class)

    if not report.problems:
        console.print("[green]no problems found[/]")
        return
    console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
    for problem in report.problems[:REPORT_LIMIT]:
        console.print(f"  {problem}", highlight=False, markup=False)
    if len(report.problems) > REPORT_LIMIT:
        console.print(f"  ... and {len(report.problems) - REPORT_LIMIT} more")
