"""Progress on stderr: a rich progress bar on a terminal, one plain line per epoch otherwise
(logs, CI, pipes). `NO_COLOR` is respected by rich itself."""

from __future__ import annotations

import sys
from typing import Any

from segcli.errors import as_flags


class Reporter:
    """Shows the trainer's events (segcli.train.trainer.TrainingEvents) on stderr."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.rich = sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

    def log(self, message: str) -> None:
        # The trainer's lines name settings as the core does (`lr`); show them as flags.
        self.console.print(as_flags(message), markup=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.rich:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(f"epoch {epoch}/{epochs}", total=steps, status="")

    def step(self, loss: float, lr: float, images_per_second: float) -> None:
        if self.rich and self._task is not None:
            status = f"loss {loss:.4f}  lr {lr:.2e}  {images_per_second:.1f} img/s"
            self._progress.update(self._task, advance=1, status=status)

    def epoch_end(self, record: dict[str, Any], best: bool) -> None:
        val = record["val"]
        line = (
            f"epoch {record['epoch']}/{record['epochs']}  train_loss {record['train_loss']:.4f}  "
            f"val_loss {record['val_loss']:.4f}  mIoU {_fmt(val['miou'])}  "
            f"mDice {_fmt(val['mdice'])}  lr {record['lr']:.2e}  "
            f"{record['images_per_second']:.1f} img/s  {record['seconds']:.1f}s"
        )
        self.log(line + ("  *best*" if best else ""))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
