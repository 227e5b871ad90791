"""The consoles and progress bars: results on stdout (`out`), progress and notes on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)  # progress bars, warnings, notes: never mixed into results
out = Console()  # results tables and summaries


def note(text: str) -> None:
    """One plain line on stderr (no markup, no wrapping): warnings and notes of the middle layer."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def training_progress() -> Progress:
    """Step counter, loss, lr and ETA; update with `progress.update(task, advance=1, loss=..., lr=...)`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def work_progress() -> Progress:
    """Items done out of total with ETA, for inference and file work."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
