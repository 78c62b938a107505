"""Data-parallel launch on CPU: `accelerate launch --cpu --num_processes N` starts one process.

Accelerate's CPU launcher runs the script once (it expects MPI for more), so a user who asks for 2 CPU
processes silently gets 1. `vlkit train` detects that case (accelerate's CPU flag and rendezvous address
set, no rank) and re-runs itself under `torch.distributed.run` with the process count the user gave.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ConfigError


def _parent_num_processes() -> int | None:
    """`--num_processes N` (or --num-processes=N) of the parent `accelerate launch`, where /proc shows it."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, a in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(args):
                return int(args[i + 1]) if args[i + 1].isdigit() else None
            if a.startswith(flag + "="):
                value = a.split("=", 1)[1]
                return int(value) if value.isdigit() else None
    return None


def cpu_launch_processes() -> int | None:
    """N when this process was started by `accelerate launch --cpu --num_processes N` (N > 1), else None."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "RANK" in env or "MASTER_PORT" not in env:
        return None
    n = _parent_num_processes()
    if n is None:
        raise ConfigError(
            "accelerate launch --cpu asked for several processes, but accelerate's CPU launcher starts one",
            hint="use torchrun --nproc_per_node N -m vlkit train ..., or accelerate "
            "launch --multi_gpu --num_processes N -m vlkit train ... device=cpu",
        )
    return n if n > 1 else None


def relaunch_under_torchrun(n: int, argv: list[str]) -> None:
    """Replace this process with `python -m torch.distributed.run --nproc_per_node n -m vlkit train ...`."""
    env = dict(os.environ)
    port = env.pop("MASTER_PORT", "29500")
    env.pop("MASTER_ADDR", None)
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        port,
        "-m",
        "vlkit",
        *argv,
    ]
    os.execve(sys.executable, cmd, env)
