"""How a domain gate (`vlkit.compose.gate`) scores an input against an adapter's training inputs, and where it sets
each adapter's threshold. Both scorers take the frozen backbone's normalised embeddings and give, per input and
adapter, a *margin*: >= 0 when the input is at least as typical as the training inputs held out at calibration.

- `GaussianScore` (images, default): Mahalanobis distance to a Gaussian fitted to the training embeddings (Lee et
  al., 2018), its covariance shrunk towards a scaled identity by the Ledoit-Wolf estimate (few shots, many
  dimensions). Threshold: K-fold cross-fitting (K = min(10, n)) gives every training embedding a distance under a
  fit that did not see it; the threshold is their (1 - quantile)-quantile (quantile 0: the largest). Margin:
  1 - d²/threshold.
- `NearestScore` (images with `score: nearest`): cosine similarity to the nearest training embedding; threshold
  the `quantile` of each one's leave-one-out nearest-neighbour similarity (quantile 0: the smallest). Margin:
  similarity - threshold.
- texts (`NearestScore` with `exact`): a classifier's texts are its few class prompts, and their leave-one-out
  similarities measure how far apart the classes are, not what an in-domain text looks like: "a photo of a
  circle" is nearer "a sketch of a circle" (0.98 on `tiny`) than two sketch prompts are to each other (at most
  0.93). A text alone reaches the adapter only when it is one of the adapter's training texts (its prompts, every
  template of an ensemble); any other text is encoded by the frozen text tower.

By exchangeability, a new in-domain input falls outside the threshold about as often as a held-out training input
does: with quantile 0 and n training inputs, about 1 / (n + 1) of them.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

SCORES = ("mahalanobis", "nearest")
NO_TEXT = 2.0  # a nearest-neighbour threshold no cosine similarity reaches: texts never pass
FOLDS = 10
EPS = 1e-6
SAME = 1.0 - 1e-4  # the similarity of an input to itself, less rounding


def leave_one_out(bank: torch.Tensor) -> torch.Tensor:
    """Each row's cosine similarity to its nearest other row (rows normalised); (n,) for n >= 2."""
    sim = bank @ bank.t()
    sim.fill_diagonal_(float("-inf"))
    return sim.max(1).values


def nearest_threshold(bank: torch.Tensor, quantile: float) -> float:
    """The `quantile` of a bank's leave-one-out similarities; a bank of one row admits only itself. Never above 1
    less a rounding margin (`SAME`)."""
    if len(bank) < 2:
        return SAME
    return min(float(torch.quantile(leave_one_out(bank).double(), float(quantile))), SAME)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, precision, shrinkage) of rows `x` (n, D): the covariance shrunk towards tr(S)/D · I by the
    Ledoit-Wolf (2004) estimate of the shrinkage, in float64."""
    x = x.double()
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    s = xc.t() @ xc / n
    m = torch.trace(s) / d
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    delta2 = float(((s - m * eye) ** 2).sum())
    beta2 = float(((xc**2).sum(1) ** 2 - 2 * ((xc @ s) * xc).sum(1) + (s**2).sum()).sum()) / n**2
    shrink = min(beta2, delta2) / delta2 if delta2 > 0 else 1.0
    cov = (1 - shrink) * s + shrink * m * eye + EPS * eye
    return mean, torch.linalg.inv(cov), float(shrink)


def mahalanobis2(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distances (n,) of rows `x` to a Gaussian (mean, precision)."""
    xc = x.to(precision.dtype) - mean
    return ((xc @ precision) * xc).sum(1)


def heldout_distances(x: torch.Tensor, folds: int = FOLDS) -> torch.Tensor:
    """Each row's squared Mahalanobis distance under a Ledoit-Wolf Gaussian fitted without it (K-fold, rows by
    index modulo K, K = min(folds, n)); (n,) for n >= 2."""
    n = len(x)
    k = min(folds, n)
    out = torch.empty(n, dtype=torch.float64)
    fold = torch.arange(n) % k
    for f in range(k):
        held = fold == f
        mean, precision, _ = ledoit_wolf(x[~held])
        out[held] = mahalanobis2(x[held], mean, precision).cpu()
    return out


class MarginScore(nn.Module, metaclass=abc.ABCMeta):
    """What the gate's scores share: fitted tensors and a threshold per adapter, as buffers (saved with the
    gate, in this order); `margins(x)` (n, k) is >= 0 where an input is near enough to adapter k's training set."""

    threshold: torch.Tensor

    def __init__(self, threshold: torch.Tensor, **fitted: torch.Tensor):
        super().__init__()
        for name, t in fitted.items():
            self.register_buffer(name, t)
        self.register_buffer("threshold", threshold.float())

    @abc.abstractmethod
    def margins(self, x: torch.Tensor) -> torch.Tensor:
        """(n, adapters): each input's score for each adapter, less that adapter's threshold."""


class NearestScore(MarginScore):
    """Nearest-neighbour cosine similarity to each adapter's bank, less its threshold."""

    bank: torch.Tensor
    owner: torch.Tensor

    def __init__(self, bank: torch.Tensor, owner: torch.Tensor, threshold: torch.Tensor):
        super().__init__(threshold, bank=F.normalize(bank.float(), dim=-1), owner=owner.long())

    @classmethod
    def fit(
        cls, banks: list[torch.Tensor], quantile: float, exact: bool = False, empty: float = NO_TEXT
    ) -> NearestScore:
        """One bank per adapter (an empty one: threshold `empty`); thresholds by `nearest_threshold`, or with
        `exact` `SAME` (only the bank's own rows pass)."""
        tau = [
            (SAME if exact else nearest_threshold(F.normalize(b.float(), dim=-1), quantile)) if len(b) else empty
            for b in banks
        ]
        d = next((b.shape[1] for b in banks), 0)
        return cls(
            torch.cat([b.float().reshape(-1, d) for b in banks]),
            torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(banks)]),
            torch.tensor(tau),
        )

    def margins(self, x: torch.Tensor) -> torch.Tensor:
        """(n, k): per adapter, the nearest neighbour's similarity less the threshold (-inf: an empty bank)."""
        k = len(self.threshold)
        out = torch.full((len(x), k), float("-inf"), device=x.device)
        if len(self.bank) == 0:
            return out
        sim = F.normalize(x.float(), dim=-1) @ self.bank.t()
        for i in range(k):
            mine = self.owner == i
            if bool(mine.any()):
                out[:, i] = sim[:, mine].max(1).values - self.threshold[i]
        return out


class GaussianScore(MarginScore):
    """Mahalanobis distance to each adapter's Ledoit-Wolf Gaussian, as the margin 1 - d²/threshold."""

    mean: torch.Tensor
    precision: torch.Tensor

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor, threshold: torch.Tensor):
        if not (
            mean.dim() == 2 and precision.shape == (*mean.shape, mean.shape[1]) and threshold.shape[0] == len(mean)
        ):
            raise ConfigError(
                f"gate Gaussians: means {tuple(mean.shape)}, precisions {tuple(precision.shape)} and thresholds "
                f"{tuple(threshold.shape)} do not agree"
            )
        super().__init__(threshold, mean=mean.float(), precision=precision.float())

    @classmethod
    def fit(cls, banks: list[torch.Tensor], quantile: float) -> tuple[GaussianScore, list[float]]:
        """One Gaussian per adapter's bank (at least two rows each); also returns each one's shrinkage."""
        means, precisions, taus, shrinks = [], [], [], []
        for b in banks:
            if len(b) < 2:
                raise ConfigError(f"a Mahalanobis gate needs at least two training images per adapter, got {len(b)}")
            x = F.normalize(b.float(), dim=-1)
            mean, precision, shrink = ledoit_wolf(x)
            taus.append(float(torch.quantile(heldout_distances(x), 1.0 - float(quantile))))
            means.append(mean)
            precisions.append(precision)
            shrinks.append(shrink)
        return cls(torch.stack(means), torch.stack(precisions), torch.tensor(taus)), shrinks

    def margins(self, x: torch.Tensor) -> torch.Tensor:
        """(n, k): per adapter, 1 - d²/threshold (>= 0: no farther than the held-out training images allowed)."""
        x = F.normalize(x.float(), dim=-1)
        cols = [1.0 - mahalanobis2(x, m, p) / t for m, p, t in zip(self.mean, self.precision, self.threshold)]
        return torch.stack(cols, dim=1).float()
