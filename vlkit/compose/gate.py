"""Domain gates: route each input to the adapter whose training inputs it resembles, or to the frozen backbone.

An adapter trained on a few shots of a new domain (satellite images, radiographs) changes the backbone for every
input, so the general domain it was never shown loses accuracy (issue 26: the photo domain's zero-shot accuracy
falls to about 75% of the frozen backbone's). A gate keeps the adapter where it was trained and the frozen
backbone everywhere else, calibrated on the adapter's own training data only (no general-domain data):

- **bank:** the frozen backbone's normalised embeddings of the adapter's training images, and of its training
  texts (the texts its task encodes: for classification the class prompts), per adapter;
- **threshold:** for each training image, the cosine similarity to its nearest *other* training image
  (leave-one-out); the threshold is the `quantile` of those (default 0: their minimum, so every training image
  would pass had it been held out). Texts likewise, over the distinct training texts (one text: only itself);
- **rule:** an input goes to the adapter whose bank holds its nearest neighbour with the largest margin over
  that adapter's threshold, and to the frozen backbone ("none") when no adapter's margin is >= 0. An image, or
  an image-text pair, is judged by its image; a text alone by its text. With one adapter this is a gate: the
  adapter on in-domain inputs, the frozen backbone elsewhere.

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
import torch.nn.functional as F
from torch import nn

from ..adapters.files import read_tensor_file
from ..data.api import few_shot, load_data, parse_data_spec
from ..data.shots import take_shots
from ..errors import ConfigError, DataError
from ..io import atomic_path
from ..tasks.base import prepare_pixels, tokenize_texts
from .composition import read_composition
from .router import RoutedBackbone, example_texts, features

GATE_KIND = "gate"
GATE_FILE = "router.safetensors"
NO_TEXT = 2.0  # a text threshold no cosine similarity reaches


@dataclass
class GateOptions:
    """How a domain gate is calibrated (`vlkit compose --mode gate`, `vlkit adapt`)."""

    quantile: float = 0.0
    """Threshold = this quantile of the training inputs' leave-one-out nearest-neighbour similarities, in [0, 1):
    0 (default) their minimum; larger values send more borderline inputs to the frozen backbone."""

    def validate(self) -> None:
        if not 0.0 <= float(self.quantile) < 1.0:
            raise ConfigError(f"gate quantile must lie in [0, 1), got {self.quantile}")


def leave_one_out(bank: torch.Tensor) -> torch.Tensor:
    """Each row's cosine similarity to its nearest other row (rows normalised); (n,) for n >= 2."""
    sim = bank @ bank.t()
    sim.fill_diagonal_(float("-inf"))
    return sim.max(1).values


def threshold(bank: torch.Tensor, quantile: float) -> float:
    """The gate threshold of one bank: the `quantile` of its leave-one-out similarities; a bank of one row admits
    only itself (1 less a rounding margin)."""
    if len(bank) < 2:
        return 1.0 - 1e-4
    return float(torch.quantile(leave_one_out(bank).double(), float(quantile)))


class DomainGate(nn.Module):
    """Nearest-neighbour gate over frozen features: `names[i]` (an adapter) for inputs like adapter i's training
    inputs, the last name (None: the frozen backbone) for the rest."""

    kind = GATE_KIND
    image_bank: torch.Tensor
    image_owner: torch.Tensor
    image_threshold: torch.Tensor
    text_bank: torch.Tensor
    text_owner: torch.Tensor
    text_threshold: torch.Tensor

    def __init__(
        self,
        dim: int,
        names: list[str | None],
        image_bank: torch.Tensor,
        image_owner: torch.Tensor,
        image_threshold: torch.Tensor,
        text_bank: torch.Tensor,
        text_owner: torch.Tensor,
        text_threshold: torch.Tensor,
    ):
        super().__init__()
        if not names or names[-1] is not None or any(n is None for n in names[:-1]):
            raise ConfigError("a gate routes to its adapters and, last, to None (the frozen backbone)")
        self.dim, self.names = int(dim), list(names)
        k = len(names) - 1
        for key, t in (("image_threshold", image_threshold), ("text_threshold", text_threshold)):
            if tuple(t.shape) != (k,):
                raise ConfigError(f"gate {key} has shape {tuple(t.shape)}, expected ({k},)")
        self.register_buffer("image_bank", F.normalize(image_bank.float(), dim=-1))
        self.register_buffer("image_owner", image_owner.long())
        self.register_buffer("image_threshold", image_threshold.float())
        self.register_buffer("text_bank", F.normalize(text_bank.float(), dim=-1))
        self.register_buffer("text_owner", text_owner.long())
        self.register_buffer("text_threshold", text_threshold.float())

    def _margins(self, x: torch.Tensor, bank: torch.Tensor, owner: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """(n, k): per adapter, the nearest neighbour's similarity in its bank less its threshold (-inf: no bank)."""
        k = len(self.names) - 1
        out = torch.full((len(x), k), float("-inf"), device=x.device)
        if len(bank) == 0:
            return out
        sim = F.normalize(x.float(), dim=-1) @ bank.t()
        for i in range(k):
            mine = owner == i
            if bool(mine.any()):
                out[:, i] = sim[:, mine].max(1).values - tau[i]
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Margins (n, k + 1): per adapter, the nearest training input's similarity less its threshold; the last
        column 0 (the frozen backbone wins where no adapter's margin is >= 0)."""
        features = features.to(self.image_bank.device).float()
        d = self.dim
        img, txt, has_image = features[:, :d], features[:, d : 2 * d], features[:, 2 * d] > 0.5
        m_img = self._margins(img, self.image_bank, self.image_owner, self.image_threshold)
        m_txt = self._margins(txt, self.text_bank, self.text_owner, self.text_threshold)
        margins = torch.where(has_image.unsqueeze(1), m_img, m_txt)  # a pair is judged by its image
        return torch.cat([margins, torch.zeros(len(features), 1, device=margins.device)], dim=1)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
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
    backbone, sources: list[tuple[str, Any, Any]], quantile: float = 0.0
) -> tuple[DomainGate, dict[str, Any]]:
    """A gate over `sources` [(adapter name, its training dataset, its task: a task object, its task.json metadata
    or None)], calibrated on those datasets and the texts the tasks encode (`task_tokens`) alone. Returns it and its
    report: per adapter the training images and texts and both thresholds."""
    GateOptions(quantile).validate()
    if not sources:
        raise ConfigError("a gate needs at least one adapter")
    img_rows, img_owner, txt_rows, txt_owner = [], [], [], []
    tau_img: list[float] = []
    tau_txt: list[float] = []
    per: dict[str, Any] = {}
    for i, (name, ds, task) in enumerate(sources):
        images, texts = _banks(backbone, ds, task)
        img_rows.append(images)
        img_owner.append(torch.full((len(images),), i, dtype=torch.long))
        txt_rows.append(texts)
        txt_owner.append(torch.full((len(texts),), i, dtype=torch.long))
        tau_img.append(threshold(images, quantile))
        # no training text: texts alone never reach this adapter (a threshold above any cosine), images still do
        tau_txt.append(threshold(texts, quantile) if len(texts) else NO_TEXT)
        per[name] = {
            "images": len(images),
            "texts": len(texts),
            "image_threshold": tau_img[-1],
            "text_threshold": tau_txt[-1] if len(texts) else None,
        }
    gate = DomainGate(
        backbone.embed_dim,
        [n for n, _, _ in sources] + [None],
        torch.cat(img_rows),
        torch.cat(img_owner),
        torch.tensor(tau_img),
        torch.cat(txt_rows),
        torch.cat(txt_owner),
        torch.tensor(tau_txt),
    )
    return gate.eval(), {"quantile": float(quantile), "per_adapter": per}


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
    from safetensors.torch import save_file

    with atomic_path(Path(out) / GATE_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()}, str(tmp))
    return {
        "kind": GATE_KIND,
        "file": GATE_FILE,
        "names": gate.names,
        "dim": gate.dim,
        "features": "frozen normalised [image, text, has_image, has_text]; nearest neighbour in each adapter's bank",
        **({"report": report} if report else {}),
    }


def load_gate(path: Path, entry: dict[str, Any], loaded_names: list[str]) -> DomainGate:
    """The gate of a composition, its names mapped to the adapters' names as loaded on the backbone."""
    spec = read_composition(path)
    mapping = dict(zip([a.get("name") for a in spec["adapters"]], loaded_names))
    names: list[str | None] = []
    for n in entry["names"]:
        if n is not None and n not in mapping:
            raise ConfigError(f"gate of {path} routes to {n!r}, which is not one of its adapters")
        names.append(mapping.get(n) if n is not None else None)
    t = read_tensor_file(path / entry.get("file", GATE_FILE))
    keys = ("image_bank", "image_owner", "image_threshold", "text_bank", "text_owner", "text_threshold")
    missing = [k for k in keys if k not in t]
    if missing:
        raise ConfigError(f"gate file {path / entry.get('file', GATE_FILE)} lacks {', '.join(missing)}")
    return DomainGate(int(entry["dim"]), names, *(t[k] for k in keys)).eval()


def is_gate(entry: dict[str, Any] | None) -> bool:
    """Whether a composition's `router` entry is a gate (else a trained router)."""
    return bool(entry) and entry.get("kind") == GATE_KIND  # type: ignore[union-attr]
