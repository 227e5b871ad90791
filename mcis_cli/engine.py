"""The stage lifecycle, written once, so that a stage module holds its method and nothing else.

A stage's `run` goes through one `Job`:

    job = engine.start(STAGE, cfg, from_run=..., resume=..., parent=...)  # ranks, seed, device, input
    model = job.first(lambda: load(job.fetch(...)))    # rank 0 first, the others find its files
    with job.open(tags=...):                           # the MLflow run, new or resumed, locked
        records = job.map("maps", items, process, key=...)  # sharded, resumable, merged in order
        job.report(lambda log: log.log_metrics(...))   # rank 0 logs for all
    return job.result(metrics, outputs)

Resume, the same for every stage and the pipeline: a run carries a key (`KEY_TAG`), the hash of
its input run, its parent, the data, the seed and the config sections the stage reads. Started
again with the same key, a stage reopens the newest unfinished run (FAILED, KILLED, or RUNNING for
a process that is gone) instead of making a new one: a training stage restores its last checkpoint
(`job.resume_file`), `job.map` skips the items whose record an earlier start wrote, and a one-shot
stage simply runs again. `--resume RUN_ID` names the run instead, and a setting that differs from
that run's is refused in one line. A FINISHED run is never reopened.

Under torchrun every rank walks the same code: rank 0 alone holds the MLflow run and the lock,
`job.map` shares the items out and waits for every rank's share, and `job.report` runs on rank 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mcis_cli import distributed, tracking
from mcis_cli.config import Config, flatten
from mcis_cli.devices import configure_speed, out_of_memory, seed_everything, select_device
from mcis_cli.errors import McisError
from mcis_cli.files import atomic_path, exclusive_file, remove_partials
from mcis_cli.progress import note, out, work_progress
from mcis_cli.provenance import dataset_fingerprint, git_commit
from mcis_cli.stages import StageResult

T = TypeVar("T")
KEY_TAG = "mcis.run_key"
KEY_FILE = "run_key.json"  # the settings behind a run's key, logged with it
RECORDS = "records"  # in a run's folder: one file per item that `job.map` finished (never logged)
UNKEYED = {"data.workers"}  # settings that change how fast a run goes, not what it makes


@dataclass(frozen=True)
class Stage:
    """What the engine needs to know of a stage."""

    name: str
    reads: tuple[str, ...] = ()  # the stages whose runs it takes as input, its default first
    sections: tuple[str, ...] | None = ()  # the config sections it reads (None: the whole config)
    memory: Callable[[Config], tuple[str, str]] | None = None  # (the size it ran at, what to lower)
    one_process: bool = False  # under torchrun rank 0 does the work and the others take its result

    def __call__(self, run: Callable[..., StageResult]) -> Callable[..., StageResult]:
        """Decorate the stage's `run(cfg, ...)`: a failed allocation becomes one line naming the
        stage, its size and the setting to lower; a one-process stage runs on rank 0 only."""

        @functools.wraps(run)
        def guarded(cfg: Config, *args: Any, **kwargs: Any) -> StageResult:
            distributed.init(cfg.device)
            if self.one_process and distributed.active():
                return distributed.broadcast(self._guarded(run, cfg, *args, **kwargs)
                                             if distributed.is_main() else None)
            return self._guarded(run, cfg, *args, **kwargs)

        return guarded

    def _guarded(self, run: Callable[..., StageResult], cfg: Config, *args: Any, **kwargs: Any) -> StageResult:
        try:
            return run(cfg, *args, **kwargs)
        except (RuntimeError, MemoryError) as exc:
            if self.memory is None or not out_of_memory(exc):
                raise
            size, setting = self.memory(cfg)
            where = "GPU" if isinstance(exc, torch.cuda.OutOfMemoryError) else "host"
            raise McisError(f"{self.name}: out of {where} memory at {size} (device {cfg.device}); "
                            f"lower {setting}") from None


def workdir(cfg: Config, run_id: str) -> Path:
    """A run's local folder: what the stage writes before it is logged, and its resume state."""
    path = Path(cfg.output_dir) / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_key(stage: Stage, cfg: Config, source: str, parent: str, extra: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs of `stage` the same run: the settings behind `KEY_TAG`, dotted."""
    tree = cfg.model_dump(mode="json")
    keyed = tree if stage.sections is None else {
        "seed": tree["seed"], "data": tree["data"], **{s: tree[s] for s in stage.sections}}
    settings = {k: v for k, v in flatten(keyed).items() if k not in UNKEYED}
    return {"stage": stage.name, "source": source, "parent": parent, **extra, **settings}


def digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def start(stage: Stage, cfg: Config, *, from_run: str | None = None, resume: str | None = None,
          parent: tracking.Nest | None = None, reads: tuple[str, ...] | None = None,
          extra: dict[str, Any] | None = None) -> Job:
    """Join torchrun's processes, seed every rank alike, pick the device and find the input run
    (`reads` replaces the stage's; with `resume`, the input is the resumed run's own). `extra`:
    options outside the config that change what the run makes (segment's labels, a split)."""
    distributed.init(cfg.device)
    seed_everything(cfg.seed, cfg.deterministic)
    configure_speed(cfg.speed, cfg.deterministic)
    device = select_device(cfg.device)
    prior = tracking.get_run(cfg, resume, stage.name) if resume else None
    if prior:
        from_run = prior.tags.get(tracking.SOURCE_TAG) or None
    reads = stage.reads if reads is None else reads
    source = tracking.resolve_run(cfg, reads, from_run) if reads else None
    settings = run_key(stage, cfg, source.run_id if source else "", parent.parent if parent else "", extra or {})
    if prior:
        _require_same(prior, settings)
    return Job(stage, cfg, device, source, parent, settings, prior.run_id if prior else None)


def _require_same(prior: tracking.SourceRun, settings: dict[str, Any]) -> None:
    """A resume continues the run as it was started: a setting of its key that changed is refused."""
    if prior.tags.get(KEY_TAG) == digest(settings):
        return
    before = json.loads(prior.fetch(KEY_FILE).read_text()) if prior.has(KEY_FILE) else {}
    changed = [k for k in dict.fromkeys([*settings, *before]) if before.get(k) != settings.get(k)]
    raise McisError(f"--resume {prior.run_id}: {changed[0]} is {before.get(changed[0])!r} in that run, "
                    f"{settings.get(changed[0])!r} now; resume with the run's own settings, or start a "
                    "new run to change it")


class Job:
    """One start of a stage in this process: the input, the run, the folder, and the helpers that
    keep ranks, locks and the tracker out of the stage's code."""

    def __init__(self, stage: Stage, cfg: Config, device: torch.device, source: tracking.SourceRun | None,
                 parent: tracking.Nest | None, settings: dict[str, Any], resume: str | None):
        self.stage, self.cfg, self.device, self.source, self.parent = stage, cfg, device, source, parent
        self.settings, self.key, self.explicit = settings, digest(settings), resume
        self.run_id = ""
        self.folder = Path()
        self.resumed = False  # whether this start continues an earlier one
        self.log: tracking.Tracker | None = None  # rank 0's; the training skeleton passes it on
        self.alone = stage.one_process or not distributed.active()
        self.reopens = True  # whether an unfinished run of the same key is continued
        self.cpus = distributed.cpus_per_rank()  # the cores this process may keep busy

    # ---- before the run ---------------------------------------------------------------------
    def first(self, fetch: Callable[[], T]) -> T:
        """`fetch()` on every rank, rank 0's first: the others find what it downloaded."""
        return fetch() if self.alone else distributed.rank_zero_first(fetch)

    def fetch(self, artifact: str) -> Path:
        """The input run's artifact, local."""
        return self.first(lambda: self.source.fetch(artifact))

    # ---- the run ----------------------------------------------------------------------------
    @contextmanager
    def open(self, *, tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
             role: str | None = None, run_name: str | None = None, lock: Path | None = None) -> Iterator[Job]:
        """The stage's MLflow run, open while the block runs: new, or the unfinished run of the
        same key reopened. `tags`, `params` and `role` are set on a new run; `lock`: an output
        file outside the run's folder that no other command may write meanwhile."""
        main = distributed.is_main() or self.alone
        with ExitStack() as stack:
            opened: tuple[str, bool] | str = ("", False)
            if main:
                try:
                    if lock is not None:
                        stack.enter_context(exclusive_file(lock, "--out file"))
                    self.log = stack.enter_context(self._run(tags or {}, params or {}, role, run_name))
                    opened = (self.log.run_id, self.resumed)
                except McisError as exc:
                    opened = str(exc)
                    if not self.alone:
                        distributed.broadcast(opened)
                    raise
            if not self.alone:
                opened = distributed.broadcast(opened)
            if isinstance(opened, str):  # rank 0 refused: every rank says why
                raise McisError(opened)
            self.run_id, self.resumed = opened
            self.folder = workdir(self.cfg, self.run_id)
            node = None if self.alone else f"rank{distributed.world()[0]}"
            stack.enter_context(tracking.system_metrics(self.cfg, self.run_id, node, self.resumed))
            yield self

    @contextmanager
    def _run(self, tags: dict[str, str], params: dict[str, Any], role: str | None,
             run_name: str | None) -> Iterator[tracking.Tracker]:
        """Rank 0's run: dead runs closed, the run found or made, its folder locked; FAILED or
        KILLED when the block raises, FINISHED once its metrics are sent."""
        cfg, stage = self.cfg, self.stage.name
        tracking.close_dead_runs(cfg)
        target = self.explicit or (self._unfinished() if self.reopens else None)
        with ExitStack() as stack:
            if target:
                tracking.check_resumable(cfg, target, stage)
                stack.enter_context(exclusive_file(Path(cfg.output_dir) / target, "--resume run"))
                remove_partials(Path(cfg.output_dir) / target)  # a kill mid-write leaves them
                tracker = tracking.reopen_run(cfg, target)
                self.resumed = True
            else:
                fingerprint = dataset_fingerprint(cfg.data.root)
                tracker = tracking.create_run(cfg, self._tags(tags, role, fingerprint), run_name or (
                    self.parent.step if self.parent else stage))
            unsent = Path(cfg.output_dir) / tracker.run_id / tracking.UNSENT
            try:
                if target:
                    tracker.replay(unsent)
                else:  # a new run's folder: only unwritable storage can make this fail
                    stack.enter_context(exclusive_file(Path(cfg.output_dir) / tracker.run_id, "output_dir"))
                    tracker.log_params(cfg.flat() | {"world_size": distributed.world()[1]} | params)
                    tracker.log_text(cfg.to_yaml(), "config.yaml")
                    tracker.log_dict(self.settings, KEY_FILE)
                    tracker.log_dataset(cfg.data.root, fingerprint, stage)
                yield tracker
            except BaseException as exc:
                tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", unsent)
                raise
            tracker.finish()

    def _unfinished(self) -> str | None:
        """The newest unfinished run of this key, to continue; refused while a process has it."""
        runs = tracking.find_runs(self.cfg, self.stage.name, finished=False, **{KEY_TAG: self.key})
        if not runs:
            return None
        found = runs[0]
        if found.status == "RUNNING":  # dead holders' runs were closed just before
            raise McisError(f"{self.stage.name} run {found.run_id}, with the same input and settings, is "
                            "still running in another process; wait for it to end, or change a setting")
        note(f"note: continuing the {found.status} {self.stage.name} run {found.run_id}, which has the same "
             "input and settings")
        return found.run_id

    def _tags(self, extra: dict[str, str], role: str | None, fingerprint: str) -> dict[str, str]:
        cfg, source = self.cfg, self.source
        tags = {
            tracking.STAGE_TAG: self.stage.name,
            tracking.SOURCE_TAG: source.run_id if source else "",
            tracking.ROLE_TAG: role or tracking.chain_role(self.stage.name, cfg, source),
            KEY_TAG: self.key,
            "mcis.dataset": cfg.data.root,
            tracking.FINGERPRINT_TAG: fingerprint,
            "mlflow.source.git.commit": git_commit(),
            "mlflow.source.name": "mcis " + self.stage.name,
        }
        if source and source.method:  # a stage that changes the method tags it (classify, localize, ...)
            tags[tracking.METHOD_TAG] = source.method
        if self.parent:
            tags |= {"mlflow.parentRunId": self.parent.parent, tracking.STEP_TAG: self.parent.step,
                     **self.parent.tags}
        return tags | {k: str(v) for k, v in extra.items()}

    def resume_file(self, artifact: str) -> Path | None:
        """The artifact of the run this start continues (its folder's copy, else the logged
        one); None for a new run or one that never wrote it."""
        if not self.resumed:
            return None
        own = tracking.get_run(self.cfg, self.run_id, self.stage.name)
        return self.first(lambda: own.local_or_fetched(self.folder / artifact, artifact))

    def finished_steps(self) -> dict[str, tracking.SourceRun]:
        """The nested runs this run finished in earlier starts, by step name (the pipeline's)."""
        done = {}
        if self.resumed and self.log is not None:
            done = tracking.finished_children(self.cfg, self.run_id, tracking.STEP_TAG)
        return done if self.alone else distributed.broadcast(done)

    # ---- work over items --------------------------------------------------------------------
    def map(self, label: str, items: Sequence[T], process: Callable[[list[T]], Iterable[tuple[T, dict]]], *,
            key: Callable[[T], str], weight: Callable[[T], float] | None = None, chunk: int = 1) -> Records:
        """Run `process` over `items` and keep what it yields for each one, a record (a dict of
        arrays and numbers), in the run's folder: the records of all items, in item order.

        Items go to `process` in fixed groups of `chunk` (the same groups whatever the number of
        processes or starts); a group whose every item has a record from an earlier start is
        skipped, any other is processed whole and only its new records are kept. Under torchrun
        each rank takes a share of the groups (balanced by `weight`) and waits for the others."""
        folder = self.folder / RECORDS / label
        keys = [key(item) for item in items]
        done = {k for k in keys if (folder / f"{k}.npz").is_file()}
        groups = [items[s : s + chunk] for s in range(0, len(items), chunk)]
        groups = [g for g in groups if any(key(item) not in done for item in g)]
        if not self.alone:
            distributed.barrier()  # every rank has listed the records before any rank writes one
            weights = [sum(map(weight, g)) for g in groups] if weight else None
            groups = distributed.shard(groups, weights)
        computed = 0
        with work_progress() as bar:
            bar.disable = not distributed.is_main()
            task = bar.add_task(label, total=len(items), completed=len(done))
            for item, record in process([item for group in groups for item in group]):
                k = key(item)
                if k in done:  # written by an earlier start; its group was computed whole
                    continue
                with atomic_path(folder / f"{k}.npz") as tmp, open(tmp, "wb") as handle:
                    np.savez_compressed(handle, **record)
                computed += 1
                bar.advance(task)
        if not self.alone:
            distributed.settle(self.stage.name)
        return Records(folder, keys, int(self.combine({"computed": computed})["computed"]))

    def combine(self, values: dict[str, float], how: str = "sum") -> dict[str, float]:
        """Per-process numbers (counters, peaks) over every process: their sum or their max."""
        if self.alone:
            return values
        if how == "sum":
            return dict(zip(values, distributed.all_sum(np.array(list(values.values()))).tolist(), strict=True))
        every = distributed.gather([values])
        return {k: max(v[k] for v in every) for k in values}

    # ---- reporting --------------------------------------------------------------------------
    def report(self, write: Callable[[tracking.Tracker], T]) -> T | None:
        """`write(tracker)` on rank 0, which holds the run: the logging for all ranks."""
        return write(self.log) if self.log is not None else None

    def print(self, *what: Any) -> None:
        """Print results once, on rank 0."""
        if distributed.is_main() or self.alone:
            out.print(*what)

    def warn(self, text: str) -> None:
        """One line on stderr, once, on rank 0."""
        if distributed.is_main() or self.alone:
            note(text)

    def result(self, metrics: dict[str, float] | None = None, outputs: dict[str, str] | None = None) -> StageResult:
        return StageResult(self.run_id, metrics or {}, outputs or {})


class Records:
    """The records `Job.map` kept, read back from their files in item order; `summed` and
    `listed` read each file once for all the fields asked."""

    def __init__(self, folder: Path, keys: list[str], computed: int):
        self.folder, self.keys, self.computed = folder, keys, computed

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.folder / f"{key}.npz") as data:
            return dict(data)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return map(self.get, self.keys)

    def summed(self, *fields: str) -> list[Any]:
        """Each field's sum over the records that have it (arrays element-wise, in item order),
        None where no record has it."""
        sums: list[Any] = [None] * len(fields)
        for record in self:
            for i, field in enumerate(fields):
                if field in record:
                    sums[i] = record[field].copy() if sums[i] is None else sums[i] + record[field]
        return sums

    def listed(self, *fields: str) -> list[list[np.ndarray]]:
        """Each field's values, in item order, from the records that have it."""
        lists: list[list[np.ndarray]] = [[] for _ in fields]
        for record in self:
            for values, field in zip(lists, fields, strict=True):
                if field in record:
                    values.append(record[field])
        return lists


@contextmanager
def stage_run(cfg: Config, stage: str, *, source: tracking.SourceRun | None = None,
              parent: tracking.Nest | None = None, **options: Any) -> Iterator[tracking.Tracker]:
    """A new run of `stage` logged by hand (tools and tests): `options` as `Job.open` takes them."""
    spec = Stage(stage)
    settings = run_key(spec, cfg, source.run_id if source else "", parent.parent if parent else "", {})
    job = Job(spec, cfg, torch.device("cpu"), source, parent, settings, None)
    job.alone, job.reopens = True, False
    with job.open(**options):
        yield job.log
