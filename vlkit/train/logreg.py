"""The linear probe as CLIP, CoOp and Tip-Adapter run it: L2-regularised logistic regression on frozen features,
fitted with L-BFGS, its strength searched on the few-shot validation split.

`fit_logistic` minimises scikit-learn's `LogisticRegression(C=c)` objective (multinomial, lbfgs):
``C · Σ_i CE(W x_i + b, y_i) + ½‖W‖²`` (the bias is not penalised), in float64 with torch's L-BFGS and a
strong-Wolfe line search, so it reaches the same solution scikit-learn does.

`search_c` is CoOp's parametric search (its `lpclip/linear_probe.py`, after CLIP's sweep): the validation
accuracy at C = 1e6, 1e4, ..., 1e-6; then `steps` rounds of a binary search in log10(C) around the best,
each keeping the better end. Ties keep the lower validation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
SEARCH_STEPS = 8


@dataclass
class LogisticFit:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    c: float
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight.t() + self.bias


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, max_iter: int = 1000, tol: float = 1e-7
) -> LogisticFit:
    """Multinomial logistic regression with L2 strength 1/c on features `x` (N, D) and labels `y` (N,)."""
    if c <= 0 or not math.isfinite(c):
        raise ConfigError(f"the inverse L2 strength C must be a positive number, got {c}")
    x = x.detach().double().cpu()
    y = y.detach().long().cpu()
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(y) == 0:
        raise ConfigError("the linear probe has no labelled training example")
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    n = len(y)

    def closure():
        opt.zero_grad()
        # scikit-learn's objective divided by C·n: the same minimiser, gradients of a friendly scale
        loss = F.cross_entropy(x @ w.t() + b, y, reduction="mean") + 0.5 * (w * w).sum() / (c * n)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny ops per iteration: more threads only wait on each other
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    state = opt.state[opt._params[0]]
    return LogisticFit(w.detach(), b.detach(), float(c), int(state.get("n_iter", 0)))


def _score(fit: LogisticFit, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = fit.logits(x)
    y = y.long().cpu()
    return float((logits.argmax(-1) == y).double().mean()), -float(F.cross_entropy(logits, y))


def search_c(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    steps: int = SEARCH_STEPS,
    max_iter: int = 1000,
) -> tuple[LogisticFit, list[dict[str, float]]]:
    """The fit at the C that scores best on the validation features, and every (C, accuracy) tried."""
    tried: list[dict[str, float]] = []
    fits: dict[float, tuple[tuple[float, float], LogisticFit]] = {}

    def evaluate(c: float):
        if c not in fits:
            fit = fit_logistic(x, y, num_classes, c, max_iter=max_iter)
            fits[c] = (_score(fit, x_val, y_val), fit)
            tried.append({"C": c, "val_accuracy": 100.0 * fits[c][0][0]})
        return fits[c]

    best = max(C_GRID, key=lambda c: evaluate(c)[0])
    lo, hi = math.log10(best) - 1.0, math.log10(best) + 1.0
    for _ in range(steps):
        left, right = evaluate(10**lo), evaluate(10**hi)
        if left[0] < right[0]:
            lo = 0.5 * (lo + hi)
        else:
            hi = 0.5 * (lo + hi)
    best = max(fits, key=lambda c: fits[c][0])
    return fits[best][1], tried
