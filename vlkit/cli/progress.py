"""Progress on stderr, drawn with rich: the library reports through callbacks (training events, probe counts)."""

from __future__ import annotations

from typing import Any

from .output import console


class TrainProgress:
    """`progress(event, **info)` for `vlkit.train.engine.run`: a bar for steps, warnings as yellow lines, notes."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: Any = None  # a rich Progress, made when training starts
        self.task: Any = None

    def __call__(self, event: str, **info: Any) -> None:
        if event == "warning":
            console.print(f"[yellow]warning:[/yellow] {info.get('message', '')}")
            return
        if event == "note":
            console.print(f"note: {info.get('message', '')}")
            return
        if not self.enabled:
            return
        if event == "start":
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=info["total"], completed=info.get("step", 0), info="")
        elif event == "step" and self.bar is not None:
            self.bar.update(
                self.task,
                completed=info["step"],
                info=f"loss {info['loss']:.4f} lr {info['lr']:.2e} {info['rate']:.0f} samples/s",
            )
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def count_progress(console, enabled: bool, label: str = "probe"):
    """progress(total) -> advance(k), drawing a transient bar on stderr; and the context to close it (probes)."""
    from contextlib import nullcontext

    if not enabled or not console.is_terminal:
        return None, nullcontext()
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )

    def start(total: int):
        task = bar.add_task(label, total=total)
        return lambda k: bar.advance(task, k)

    return start, bar
