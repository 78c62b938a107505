"""Training progress on stderr: the library reports events through a callback, this draws them with rich."""
from __future__ import annotations

from typing import Any

from .output import console


class TrainProgress:
    """`progress(event, **info)` for `vlkit.train.engine.run`: a bar for steps, warnings as yellow lines."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.task = None

    def __call__(self, event: str, **info: Any) -> None:
        if event == "warning":
            console.print(f"[yellow]warning:[/yellow] {info.get('message', '')}")
            return
        if not self.enabled:
            return
        if event == "start":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("train", total=info["total"], completed=info.get("step", 0), info="")
        elif event == "step" and self.bar is not None:
            self.bar.update(self.task, completed=info["step"],
                            info=f"loss {info['loss']:.4f} lr {info['lr']:.2e} {info['rate']:.0f} samples/s")
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
