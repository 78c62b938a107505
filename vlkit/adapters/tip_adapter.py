"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few-shot training images on the image features.

The cache sits at the vision tower's `proj` site (the image embedding before normalisation). With `f` the
normalised image feature, keys `K` (N, D: the normalised features of the N few-shot images), values `L`
(N, C: their one-hot labels) and the class text embeddings `W` (C, D) of the classes the values index,
Tip-Adapter's logits are

    logits = s · f Wᵀ + α · A L,        A = exp(−β (1 − f Kᵀ))                (s: the logit scale)

The layer returns `f' = f·‖f‖ + ‖f‖ · (α / s) · (A L) R` where `R` (C, D), the **readout**, is the dual basis
of `W` (`R Wᵀ = I`, `torch.linalg.pinv(Wᵀ)`): the classification head's `s · norm(f') Wᵀ` is then Tip-Adapter's
logits divided by one positive number per image, so its predictions are exactly Tip-Adapter's (when C ≤ D
and the class embeddings are linearly independent; least squares otherwise). Saved state: `keys`, `values`,
`readout` (tensors) and `alpha`, `beta`, `logit_scale`, `class_names`, `cache_size`, `num_classes` (config).

- `tip-adapter`: built from the data with **no training**: every tensor is a buffer (`training_free`).
- `tip-adapter-f`: the same with the keys trainable (an `nn.Parameter`), initialised from the training data.

Both are an all-zero cache (the identity) when injected without data; `vlkit train` fills them through the
variant's `options_from_data` / `init_from_data` hooks (tip-adapter only with `optim.steps=0`).

**Building one** (what `vlkit adapt --method tip-adapter` calls)::

    build_tip_adapter(backbone, dataset, *, task=None, class_names=None, prompt=None, alpha=1.0, beta=5.5,
                      name="tip-adapter", variant="tip-adapter", batch_size=64, out=None) -> InjectionRecord

`dataset`: a `datasets.Dataset` with `image` and `label` columns (the few-shot training set), or prepared
tensors `{"pixels": (N, 3, S, S), "labels": (N,)}`. `task`: a classification task (its class names and text
head give `W`); without one a `ClassificationTask(backbone, dataset, class_names=..., prompt=...)` is built.
The features are those of the backbone as it is when called (its active adapters, without this one). The
adapter `name` is injected, filled and made active; `record.task` holds the task's metadata; with `out` the
adapter directory is written there too (`vlkit.save_adapter(backbone, out, name=name, task=...)`).
`variant="tip-adapter-f"` builds the trainable form (keys as parameters) the same way.

**Choosing α and β** (Tip-Adapter's protocol: searched on a validation set): with `val` (a labelled few-shot
validation set, same form as `dataset`), `build_tip_adapter` scores every (α, β) of `ALPHAS` × `BETAS` on it
from features computed once (`search_alpha_beta`) and builds the cache with the best pair; ties go to the pair
nearest the paper's default (1, 5.5). `record.config` then holds the chosen α and β, and `record.search` the
validation accuracy of the pick and of the default.

Composition: stacks with other adapters; cannot be merged into the weights, and two caches cannot be merged
elementwise (their keys are different examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..plugins import registry
from .base import AdapterConfig, AdapterVariant
from .model import AdaptedModel


@dataclass
class TipAdapterConfig(AdapterConfig):
    towers: str = "vision"
    """vision: the cache acts on the image features (both is read as vision)."""
    alpha: float = 1.0
    """α, the weight of the cache logits added to the zero-shot logits."""
    beta: float = 5.5
    """β, the sharpness of the cache affinity exp(−β (1 − f Kᵀ)), >= 0."""
    logit_scale: float = 100.0
    """The head's logit scale s (> 0); vlkit train sets the backbone's."""
    cache_size: int = 16
    """Cache entries: the few-shot training images (>= 1); vlkit train sets it from the data."""
    num_classes: int = 2
    """Classes the cache values index (>= 1); vlkit train sets it from the task."""
    class_names: list[str] | None = None
    """The num_classes class names; vlkit train sets them from the task."""

    def validate(self) -> None:
        super().validate()
        if self.towers == "both":  # the cache reads image features only
            self.towers = "vision"
        if self.towers != "vision":
            raise ConfigError(
                f"the Tip-Adapter cache acts on the image features: towers must be vision, got {self.towers!r}"
            )
        if self.cache_size < 1:
            raise ConfigError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not self.logit_scale > 0:
            raise ConfigError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}")


class TipCache(nn.Module):
    keys: torch.Tensor
    values: torch.Tensor
    readout: torch.Tensor

    def __init__(self, width: int, config: TipAdapterConfig, trainable_keys: bool):
        super().__init__()
        keys = torch.zeros(config.cache_size, width)
        if trainable_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.register_buffer("values", torch.zeros(config.cache_size, config.num_classes))
        self.register_buffer("readout", torch.zeros(config.num_classes, width))
        self.alpha = float(config.alpha)
        self.beta = float(config.beta)
        self.logit_scale = float(config.logit_scale)

    def cache_logits(self, y: torch.Tensor) -> torch.Tensor:
        """α · A L (B, C) for image features `y` (B, D)."""
        f = F.normalize(y, dim=-1)
        affinity = f @ self.keys.to(y.dtype).t()
        return self.alpha * torch.exp(-self.beta * (1 - affinity)) @ self.values.to(y.dtype)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        norm = y.norm(dim=-1, keepdim=True)
        return y + norm * (self.cache_logits(y) / self.logit_scale) @ self.readout.to(y.dtype)


class TipAdapterVariant(AdapterVariant[TipAdapterConfig]):
    name = "tip-adapter"
    summary = "Tip-Adapter: training-free key-value cache of few-shot image features (alpha, beta)"
    config_cls = TipAdapterConfig
    kinds = ("output",)
    backbone_kinds = ("contrastive",)  # a cache over a dual encoder's image embeddings and class texts
    default_roles = ("proj",)
    training_free = True
    trainable_keys = False
    composition_limits = {
        "merge": "Tip-Adapter caches hold different examples; build one cache from the union of the data instead"
    }

    def create_layer(self, site, config: TipAdapterConfig, base=None) -> nn.Module:
        return TipCache(site.out_features, config, self.trainable_keys)

    def describe_state(self, config, tensors):
        values = next((t for k, t in tensors.items() if k.endswith(".values")), None)
        keys = next((t for k, t in tensors.items() if k.endswith(".keys")), None)
        yield "cache", f"{config.get('cache_size')} examples, {config.get('num_classes')} classes"
        yield "alpha / beta", f"{config.get('alpha')} / {config.get('beta')}"
        if values is not None:
            per = values.float().sum(0).round().long().tolist()
            names = config.get("class_names") or [str(i) for i in range(len(per))]
            yield "examples per class", ", ".join(f"{n}: {c}" for n, c in zip(names, per))
        if keys is not None:
            yield "key norm (mean; 1 = as built)", f"{float(keys.float().norm(dim=-1).mean()):.4g}"

    def options_from_data(self, backbone, task, train_data, options: dict[str, Any]) -> dict[str, Any]:
        names = getattr(task, "class_names", None)
        if not names or not hasattr(task, "class_embeddings"):
            raise ConfigError(f"{self.name} needs a classification task (class names and a text head)")
        try:
            n = len(train_data)
        except TypeError:
            raise ConfigError(
                f"{self.name} builds its cache from a map-style training set; this one is streaming"
            ) from None
        if n < 1:
            raise DataError(f"{self.name}: the training set is empty")
        return {
            **options,
            "cache_size": n,
            "num_classes": len(names),
            "class_names": list(names),
            "logit_scale": float(backbone.logit_scale),
        }

    def init_from_data(self, backbone, name: str, task, train_data) -> None:
        fill_cache(backbone, name, task, task.prepare(backbone, train_data))


class TipAdapterFVariant(TipAdapterVariant):
    name = "tip-adapter-f"
    summary = "Tip-Adapter-F: the Tip-Adapter cache with trainable keys, initialised from the training data"
    training_free = False
    trainable_keys = True


def _features(backbone, pixels, batch_size: int) -> torch.Tensor:
    ref = next(backbone.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            chunk = pixels[i : i + batch_size]
            chunk = torch.stack(list(chunk)) if not isinstance(chunk, torch.Tensor) else chunk
            out.append(backbone.encode_image(chunk.to(device), normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, backbone.embed_dim)


def fill_cache(backbone, name: str, task, data: dict[str, Any], batch_size: int = 64) -> None:
    """Fill the cache of adapter `name` from prepared data {"pixels", "labels"} (the adapter is kept inactive
    while the features are computed) and the task's class embeddings."""
    model = AdaptedModel.of(backbone)
    [module] = model.adapter_layers(name).values()
    layer = cast(TipCache, module)
    with model.activated(*(n for n in model.active_adapters if n != name), mode=model.active_mode):
        feats = _features(backbone, data["pixels"], batch_size)
        with torch.no_grad():
            class_emb = task.class_embeddings(backbone).float().cpu()
    labels = torch.as_tensor(data["labels"]).long().cpu()
    n, c = layer.keys.shape[0], layer.values.shape[1]
    if len(feats) != n or class_emb.shape[0] != c:
        raise ConfigError(
            f"adapter {name!r} has a cache of {n} examples and {c} classes; the data has "
            f"{len(feats)} examples and the task {class_emb.shape[0]} classes"
        )
    values = torch.zeros(n, c)
    ok = labels >= 0
    values[ok.nonzero().flatten(), labels[ok]] = 1.0
    readout = torch.linalg.pinv(class_emb.double().t()).float()
    with torch.no_grad():
        for t, v in ((layer.keys, feats), (layer.values, values), (layer.readout, readout)):
            t.copy_(v.to(device=t.device, dtype=t.dtype))


ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
BETAS = (1.0, 2.0, 3.5, 5.5, 7.0, 10.0, 20.0, 50.0)


def _class_embeddings(backbone, task) -> torch.Tensor:
    with torch.no_grad():
        return task.class_embeddings(backbone).float().cpu()


def search_alpha_beta(
    backbone,
    task,
    train: dict[str, Any],
    val: dict[str, Any],
    *,
    alphas=ALPHAS,
    betas=BETAS,
    default: tuple[float, float] = (1.0, 5.5),
    batch_size: int = 64,
) -> dict[str, Any]:
    """The (α, β) of `alphas` × `betas` whose Tip-Adapter logits `s f Wᵀ + α exp(−β (1 − f Kᵀ)) L` are most
    accurate on the prepared validation data `val`; the cache is `train` (prepared), features from the backbone
    as it is now. Ties go to the pair nearest `default` (log distance). Returns {"alpha", "beta", "accuracy",
    "default_accuracy", "grid": {(α, β): accuracy}}."""
    import math

    W = _class_embeddings(backbone, task)
    keys = _features(backbone, train["pixels"], batch_size)
    feats = _features(backbone, val["pixels"], batch_size)
    labels = torch.as_tensor(train["labels"]).long()
    target = torch.as_tensor(val["labels"]).long()
    if len(target) < 1:
        raise DataError("the Tip-Adapter validation set is empty")
    onehot = torch.zeros(len(labels), W.shape[0])
    ok = labels >= 0
    onehot[ok.nonzero().flatten(), labels[ok]] = 1.0
    zero_shot = float(backbone.logit_scale) * feats @ W.t()
    affinity = feats @ keys.t()
    grid = {}
    for b in betas:
        cache = torch.exp(-float(b) * (1 - affinity)) @ onehot
        for a in alphas:
            pred = (zero_shot + float(a) * cache).argmax(-1)
            grid[(float(a), float(b))] = float((pred == target).float().mean()) * 100

    def distance(pair):
        return abs(math.log(pair[0] / default[0])) + abs(math.log(pair[1] / default[1]))

    best = max(grid, key=lambda pair: (grid[pair], -distance(pair)))
    if default not in grid:
        pred = (zero_shot + default[0] * torch.exp(-default[1] * (1 - affinity)) @ onehot).argmax(-1)
        grid[default] = float((pred == target).float().mean()) * 100
    return {"alpha": best[0], "beta": best[1], "accuracy": grid[best], "default_accuracy": grid[default], "grid": grid}


def build_tip_adapter(
    backbone,
    dataset,
    *,
    task=None,
    class_names: list[str] | None = None,
    prompt: str | None = None,
    alpha: float = 1.0,
    beta: float = 5.5,
    name: str = "tip-adapter",
    variant: str = "tip-adapter",
    batch_size: int = 64,
    out: str | Path | None = None,
    val=None,
):
    """Build a Tip-Adapter cache from few-shot data with no training (see the module docstring)."""
    if variant not in ("tip-adapter", "tip-adapter-f"):
        raise ConfigError(f"variant must be tip-adapter or tip-adapter-f, got {variant!r}")
    prepared = isinstance(dataset, dict)
    if task is None:
        ClassificationTask = registry("task").get("classification")
        opts = {k: v for k, v in (("class_names", class_names), ("prompt", prompt)) if v is not None}
        task = ClassificationTask(backbone, None if prepared else dataset, **opts)
    data = dataset if prepared else task.prepare(backbone, dataset)
    if "pixels" not in data or "labels" not in data:
        raise DataError("build_tip_adapter needs prepared data with 'pixels' and 'labels'")
    n = len(data["labels"])
    if n < 1:
        raise DataError("build_tip_adapter: the few-shot set is empty")
    names = list(task.class_names)
    search = None
    if val is not None:
        val_data = val if isinstance(val, dict) else task.prepare(backbone, val)
        search = search_alpha_beta(
            backbone, task, data, val_data, default=(float(alpha), float(beta)), batch_size=batch_size
        )
        alpha, beta = search["alpha"], search["beta"]
    model = AdaptedModel.of(backbone)
    model.add_adapter(
        name,
        variant,
        trainable=variant == "tip-adapter-f",
        alpha=alpha,
        beta=beta,
        cache_size=n,
        num_classes=len(names),
        class_names=names,
        logit_scale=float(backbone.logit_scale),
    )
    fill_cache(backbone, name, task, data, batch_size=batch_size)
    record = model.records[name]
    record.task = task.metadata()
    record.search = None if search is None else {k: v for k, v in search.items() if k != "grid"}
    if out is not None:
        model.save_adapter(out, name=name, task=record.task)
    return record
