"""Run logs: metrics as JSON lines (and TensorBoard when installed), and a PNG of the training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import atomic_path, write_text


class MetricsLog:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run logs the steps after its checkpoint again)."""
        if not self.enabled or not self.path.is_file():
            return

        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if isinstance(row, dict) and int(row.get("step", 0)) <= step:
                keep.append(line)
        write_text(self.path, "".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(history: list[dict[str, Any]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [r["loss"] for r in history], label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    ev = [(r["step"], r[f"eval/{metric}"]) for r in history if f"eval/{metric}" in r]
    if ev:
        axes[1].plot([s for s, _ in ev], [v for _, v in ev], marker="o", label=f"eval {metric}")
        axes[1].legend()
    axes[1].set_xlabel("step")
    axes[1].set_title("evaluation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
