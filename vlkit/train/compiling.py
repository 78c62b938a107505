"""The recipe key `compile`: false (eager), true (torch.compile the training step) or auto.

Before training, `compiled_step` checks that compilation works on the training device by compiling and
running a tiny function (a fresh code object, so an earlier success in the process is not reused; the
inductor's own caches key on the compiler, so a compiler that went missing is still found). Where it does
not work, `compile: true` stops with one line saying why (a ConfigError, exit 2) and `compile: auto` trains
eager, reporting a "note" event (the CLI prints `note: ...`).
"""

from __future__ import annotations

import types
from typing import Any

from ..errors import ConfigError

CHOICES = (False, True, "auto")


def check_compile_setting(value: Any, source: str = "<recipe>") -> None:
    """The recipe check: `compile` is true, false or auto."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"{source}: key 'compile': expected true, false or auto, got {value!r}")


def _probe(x):
    import torch

    return torch.sin(x) * 1.5 + 1.0


def compile_problem(device: Any = "cpu") -> str | None:
    """None when torch.compile compiles and runs a tiny function on `device`; else why not, in one line."""
    import torch

    fn = types.FunctionType(_probe.__code__.replace(), _probe.__globals__, "vlkit_compile_check")
    try:
        x = torch.linspace(0.0, 1.0, 8, device=device)
        got = torch.compile(fn, fullgraph=True)(x)
        if not torch.allclose(got.cpu(), _probe(x).cpu(), atol=1e-5):
            return "the compiled check function computes wrong values"
    except Exception as exc:  # noqa: BLE001 - whatever stops the compiler (missing C++ compiler, triton, ...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else ""
        return f"{type(exc).__name__}: {text[:300]}" if not text.startswith(type(exc).__name__) else text[:300]
    return None


def compiled_step(model, setting: Any, device: Any, report=None):
    """`model` compiled (torch.compile) as `setting` asks, once the check passed; `model` itself for false, and
    for auto where compilation does not work (with a "note" event through `report(event, **info)`)."""
    import torch

    if setting is False or setting is None:
        return model
    check_compile_setting(setting)
    problem = compile_problem(device)
    if problem is None:
        return torch.compile(model)
    if setting == "auto":
        if report is not None:
            report("note", message=f"compile: auto: torch.compile does not work here ({problem}); training eager")
        return model
    raise ConfigError(
        f"compile: true, but torch.compile does not work here: {problem}",
        hint="install a C++ compiler (the inductor needs one), or set compile: auto or false",
    )
