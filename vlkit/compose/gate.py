"""Domain gates: route each input to the adapter whose training inputs it resembles, or to the frozen backbone.

An adapter trained on a few shots of a new domain (satellite images, radiographs) changes the backbone for every
input, so the general domain it was never shown loses accuracy (issue 26: the photo domain's zero-shot accuracy
falls to about 75% of the frozen backbone's). A gate keeps the adapter where it was trained and the frozen
backbone everywhere else, calibrated on the adapter's own training data only (no general-domain data, no training):

- **what it compares:** the frozen backbone's normalised embeddings of an input and of the adapter's training
  images, or for a text alone of the texts its task encodes (for classification its class prompts);
- **score and threshold** (`vlkit.compose.gate_scores`): an image's Mahalanobis distance to a Gaussian fitted to
  the training images (covariance shrunk by the Ledoit-Wolf estimate), the threshold the largest distance of a
  training image under a fit that did not see it (10-fold cross-fitting; `quantile` lowers it), so a new
  in-domain image falls outside about as often as a held-out training image; `score: nearest` uses the cosine
  similarity to the nearest training image instead (threshold: the smallest leave-one-out one). A text alone
  reaches the adapter only when it is one of the adapter's training texts (its own class prompts; "a photo of a
  circle" is not "a sketch of a circle");
- **rule:** an input goes to the adapter with the largest margin inside its threshold, and to the frozen backbone
  ("none") when it is inside no adapter's. An image, or an image-text pair, is judged by its image; a text alone
  by its text. With one adapter this is a gate: the adapter on in-domain inputs, the frozen backbone elsewhere.

The gate is a router (`names`, `predict(features)`, `view(backbone)`, the features of `vlkit.compose.router`),
so a route composition serves it, evaluates it and runs it like a trained router: `vlkit compose A --mode gate
-o DIR`, and `vlkit adapt` writes one for its adapter into `OUT/gated/`. It changes inference: every input
costs one frozen forward more (for its embedding), and a gated adapter cannot be merged into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.files import read_tensor_file
from ..data.api import few_shot, load_data, parse_data_spec
from ..data.shots import take_shots
from ..errors import ConfigError, DataError
from ..tasks.base import prepare_pixels, tokenize_texts
from .gate_scores import SCORES, GaussianScore, NearestScore
from .router import RoutedBackbone, example_texts, features, routed_names, save_routing

GATE_KIND = "gate"
GATE_FILE = "router.safetensors"


@dataclass
class GateOptions:
    """How a domain gate is calibrated (`vlkit compose --mode gate`, `vlkit adapt`)."""

    quantile: float = 0.0
    """Share of the held-out training images allowed outside the image threshold, in [0, 1): 0 (default) sets it at
    the least typical of them; larger values send more borderline images to the frozen backbone."""
    score: str = "mahalanobis"
    """How an image is compared with an adapter's training images: mahalanobis (distance to their Ledoit-Wolf
    Gaussian) or nearest (cosine similarity to the nearest one). A text alone passes only when it is one of the
    adapter's training texts (`vlkit.compose.gate_scores`)."""

    def validate(self) -> None:
        if not 0.0 <= float(self.quantile) < 1.0:
            raise ConfigError(f"gate quantile must lie in [0, 1), got {self.quantile}")
        if self.score not in SCORES:
            raise ConfigError(f"gate score must be one of {', '.join(SCORES)}, got {self.score!r}")


class DomainGate(nn.Module):
    """A gate over frozen features: `names[i]` (an adapter) for inputs like adapter i's training inputs, the last
    name (None: the frozen backbone) for the rest. `image` and `text` score an input against each adapter's
    training images and texts (`vlkit.compose.gate_scores`)."""

    kind = GATE_KIND

    def __init__(self, dim: int, names: list[str | None], image: GaussianScore | NearestScore, text: NearestScore):
        super().__init__()
        if not names or names[-1] is not None or any(n is None for n in names[:-1]):
            raise ConfigError("a gate routes to its adapters and, last, to None (the frozen backbone)")
        k = len(names) - 1
        for part, scorer in (("image", image), ("text", text)):
            if len(scorer.threshold) != k:
                raise ConfigError(f"the gate's {part} score has {len(scorer.threshold)} thresholds for {k} adapters")
        self.dim, self.names = int(dim), list(names)
        self.score = "mahalanobis" if isinstance(image, GaussianScore) else "nearest"
        self.image, self.text = image, text

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Margins (n, k + 1): per adapter, how far inside its threshold the input is (>= 0: inside); the last
        column 0 (the frozen backbone wins where no adapter's margin is >= 0)."""
        features = features.to(self.text.threshold.device).float()
        d = self.dim
        img, txt, has_image = features[:, :d], features[:, d : 2 * d], features[:, 2 * d] > 0.5
        margins = torch.where(has_image.unsqueeze(1), self.image.margins(img), self.text.margins(txt))
        return torch.cat([margins, torch.zeros(len(features), 1, device=margins.device)], dim=1)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Index into `names` per input: the adapter with the largest margin when it is >= 0, else None's."""
        margins = self(features)
        best = margins[:, :-1].max(1)
        none = torch.full_like(best.indices, len(self.names) - 1)
        return torch.where(best.values >= 0, best.indices, none)

    def view(self, backbone) -> RoutedBackbone:
        """`backbone` seen through this gate: each encoder input through its adapter or the frozen backbone."""
        return RoutedBackbone(backbone, self)


def task_tokens(backbone, ds, task) -> torch.Tensor | None:
    """The token ids of the distinct texts a task encodes: a task object's class prompts (every class and template:
    its `ensemble_tokens`, where it has them), else the texts its examples carry (`Task.input_texts`, e.g. the
    question for vqa; `task` a task object or its task.json metadata); None when there are none."""
    tokens = getattr(task, "ensemble_tokens", None)
    if isinstance(tokens, torch.Tensor) and len(tokens):
        return torch.unique(tokens, dim=0)
    meta = task.metadata() if hasattr(task, "metadata") else task
    texts = sorted({t for t in example_texts(ds, meta, (meta or {}).get("name")) if t})
    return tokenize_texts(backbone, texts) if texts else None


@torch.no_grad()
def _banks(backbone, ds, task) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen normalised embeddings of `ds`'s images and of the distinct texts `task` encodes (`task_tokens`)."""
    if "image" not in ds.column_names or len(ds) == 0:
        raise DataError(f"a gate is calibrated on images; the data has no image rows ({ds.column_names})")
    pixels = prepare_pixels(backbone, ds).materialize()
    d = backbone.embed_dim
    images = features(backbone, pixels, None)[:, :d].cpu()
    tokens = task_tokens(backbone, ds, task)
    if tokens is None:
        return images, torch.zeros(0, d)
    return images, features(backbone, None, tokens)[:, d : 2 * d].cpu()


def calibrate_gate(
    backbone, sources: list[tuple[str, Any, Any]], quantile: float = 0.0, score: str = "mahalanobis"
) -> tuple[DomainGate, dict[str, Any]]:
    """A gate over `sources` [(adapter name, its training dataset, its task: a task object, its task.json metadata
    or None)], calibrated on those datasets and the texts the tasks encode (`task_tokens`) alone; `quantile` and
    `score` as `GateOptions`. Returns it and its report: per adapter the training images and texts, both
    thresholds (and the covariance shrinkage of a Mahalanobis score)."""
    GateOptions(quantile, score).validate()
    if not sources:
        raise ConfigError("a gate needs at least one adapter")
    banks = [_banks(backbone, ds, task) for _, ds, task in sources]
    images = [b[0] for b in banks]
    shrinks: list[float | None] = [None] * len(sources)
    image: GaussianScore | NearestScore
    if score == "mahalanobis":
        image, found = GaussianScore.fit(images, quantile)
        shrinks = list(found)
    else:
        image = NearestScore.fit(images, quantile)
    text = NearestScore.fit([b[1] for b in banks], quantile, exact=True)  # no text: texts never reach it
    per: dict[str, Any] = {}
    for i, ((name, _, _), (imgs, texts)) in enumerate(zip(sources, banks)):
        per[name] = {
            "images": len(imgs),
            "texts": len(texts),
            "image_threshold": float(image.threshold[i]),
            "text_threshold": float(text.threshold[i]) if len(texts) else None,
            **({"shrinkage": shrinks[i]} if shrinks[i] is not None else {}),
        }
    gate = DomainGate(backbone.embed_dim, [n for n, _, _ in sources] + [None], image, text)
    return gate.eval(), {"quantile": float(quantile), "score": score, "per_adapter": per}


def training_data(spec: dict[str, Any] | str, seed: int = 0):
    """The dataset an adapter trained on, from its recipe's `data.train` spec: its `shots` drawn as the trainer
    draws them (`vlkit.data.shots`; k per class with the recipe's `seed` where the kind does not draw them)."""
    spec = parse_data_spec(spec)
    k = take_shots(spec, seed)
    ds = load_data(spec)
    return few_shot(ds, k, seed=seed) if k is not None else ds


def recipe_seed(adapter_dir: Path) -> int:
    """The `seed` of the recipe an adapter was trained with (0 without one)."""
    from omegaconf import OmegaConf

    recipe = Path(adapter_dir) / "recipe.yaml"
    if not recipe.is_file():
        return 0
    cfg = OmegaConf.to_container(OmegaConf.load(recipe), resolve=True)
    seed = cfg.get("seed") if isinstance(cfg, dict) else None
    return int(seed) if seed is not None else 0


def save_gate(gate: DomainGate, out: Path, report: dict | None = None) -> dict[str, Any]:
    """Write the gate's banks and thresholds (router.safetensors); returns the `router` entry of composition.json."""
    return save_routing(gate, out, GATE_FILE, report, GATE_KIND, score=gate.score)


def load_gate(path: Path, entry: dict[str, Any], loaded_names: list[str]) -> DomainGate:
    """The gate of a composition, its names mapped to the adapters' names as loaded on the backbone."""
    names = routed_names(path, entry, loaded_names, "gate")
    file = path / entry.get("file", GATE_FILE)
    t = read_tensor_file(file)
    score = entry.get("score", "mahalanobis")
    image_keys = ("mean", "precision", "threshold") if score == "mahalanobis" else ("bank", "owner", "threshold")
    keys = [f"image.{k}" for k in image_keys] + [f"text.{k}" for k in ("bank", "owner", "threshold")]
    missing = [k for k in keys if k not in t]
    if missing or score not in SCORES:
        raise ConfigError(f"gate file {file} is not a {score} gate: it lacks {', '.join(missing) or 'a known score'}")
    image_cls = GaussianScore if score == "mahalanobis" else NearestScore
    image = image_cls(*(t[f"image.{k}"] for k in image_keys))
    text = NearestScore(*(t[f"text.{k}"] for k in ("bank", "owner", "threshold")))
    return DomainGate(int(entry["dim"]), names, image, text).eval()


def is_gate(entry: dict[str, Any] | None) -> bool:
    """Whether a composition's `router` entry is a gate (else a trained router)."""
    return bool(entry) and entry.get("kind") == GATE_KIND  # type: ignore[union-attr]
