"""Image classification with a head initialised from class-name prompts (CLIP zero-shot weights).

Columns: `image` (PIL) and `label` (an int whose names come from a `datasets.ClassLabel` feature, or
a string class name); an optional `domain` column picks a prompt template its dataset kind declares.

Options:
- `class_names`: the label names in label-id order (default: `ds.features["label"].names`).
- `prompt`: a template with one `{}` for the class name. Default: the prompt a dataset kind declares for
  the data's `domain` column (`vlkit.data.kinds.domain_defaults`; the world's per-domain template) when
  there is one (one domain, or several sharing a template), else "a photo of a {}".
- `templates`: a prompt ensemble instead (`vlkit.tasks.templates`: a list, `imagenet` for CLIP's 80, or a
  file): each class embedding is the mean of its normalised template embeddings, renormalised.
  Words of the prompts the tokenizer does not know give one warning naming them; an error when two classes'
  prompts become identical.
- `head`: "text" (default) — logits = logit_scale · norm(image) · norm(text(prompt(c)))ᵀ with the class
  embeddings recomputed through the current, possibly adapted, text tower at every training step so
  that text-tower adapters learn (computed once per `evaluate`). The head itself has no parameters.
  "linear" — a free `nn.Linear` over the normalised image embedding, initialised to the zero-shot
  weights (logit_scale · class embeddings, zero bias) and trained; the linear-probe baseline.

Prepared tensors: `pixels` (N, 3, S, S) float, `labels` (N,) long (-1 for a class name the task does
not know: ignored by the loss, a miss for the metrics). Eval data whose ClassLabel lists the names
in another order is mapped by name.

Metrics: `accuracy` (primary, percent) and `per_class_accuracy` (mean over the classes present of
each class's accuracy, i.e. balanced accuracy, percent).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.kinds import domain_defaults
from ..data.pipeline import LazyImages
from ..errors import ConfigError, DataError, VlkitWarning
from . import metrics as M
from .base import (
    Evaluating,
    Task,
    batches,
    check_options,
    dataset_domains,
    device_of,
    prepare_pixels,
    require_columns,
    to_device,
    tokenize_texts,
)
from .features import image_embed
from .templates import resolve_templates

DEFAULT_PROMPT = "a photo of a {}"
HEADS = ("text", "linear")


def label_names(ds) -> list[str] | None:
    """The names of a ClassLabel `label` column, or None."""
    feat = getattr(ds, "features", {}).get("label") if ds is not None else None
    names = getattr(feat, "names", None)
    return list(names) if names else None


def default_prompt(ds) -> str:
    """The template a dataset kind declares for the data's domain(s) (`vlkit.data.kinds.domain_defaults`, e.g.
    the world's) when they agree, else "a photo of a {}"."""

    domains = dataset_domains(ds)
    if not domains:
        return DEFAULT_PROMPT
    prompts = {(domain_defaults(d) or {}).get("prompt") for d in domains}
    prompt = prompts.pop() if len(prompts) == 1 else None
    return prompt if isinstance(prompt, str) else DEFAULT_PROMPT


def check_vocabulary(backbone, class_names: list[str], templates: list[str], tokens: torch.Tensor) -> None:
    """Warn (VlkitWarning) naming the words of the class prompts the tokenizer maps to its unknown token; a
    ConfigError when that makes two classes' prompts identical (`tokens`: class-major, one row per template)."""
    unknown = backbone.unknown_words([t.format(c) for c in class_names for t in templates])
    if not unknown:
        return
    words = ", ".join(repr(w) for w in unknown)
    rows = tokens.view(len(class_names), -1)
    seen: dict[tuple[int, ...], str] = {}
    clashes = []
    for name, row in zip(class_names, rows.tolist()):
        other = seen.setdefault(tuple(row), name)
        if other != name:
            clashes.append((other, name))
    if clashes:
        pairs = "; ".join(f"{a!r} and {b!r}" for a, b in clashes[:5])
        raise ConfigError(
            f"classes {pairs} get identical prompts: the tokenizer of {backbone.spec!r} does not know {words}",
            hint="rename the classes (class_names) with words it knows, or use a backbone whose tokenizer knows them",
        )
    warnings.warn(
        f"the tokenizer of {backbone.spec!r} does not know {words} (in the class prompts): each becomes "
        "its unknown token",
        VlkitWarning,
        stacklevel=3,
    )


class LinearHead(nn.Module):
    """A linear classifier over normalised image embeddings."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.zero_()

    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        return self.linear(image_emb)


@dataclass
class ClassificationOptions:
    """The options of the `classification` task."""

    prompt: str | None = None
    """Class prompt template with one {} for the class name; None: the prompt the data's dataset kind declares
    for its domain, else 'a photo of a {}'."""
    head: str = "text"
    """text: logits against the class prompts' embeddings through the (adapted) text tower, no parameters;
    linear: a trained linear head initialised to them (the linear probe)."""
    class_names: list[str] | None = None
    """Label names in label-id order, no duplicates; None: the training data's ClassLabel names."""
    templates: list[str] | str | None = None
    """A prompt ensemble instead of one prompt: templates (each with one {}), a named set (imagenet: CLIP's 80) or
    a file of templates; each class's embedding is the renormalised mean over its templates' embeddings."""


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    required = ("image", "label")
    options_cls = ClassificationOptions
    linear_probe_options = {"head": "linear"}
    show_columns = ("label_name", "caption")
    exportable = True
    zero_shot_options = {"head": "text"}
    adapt_default = True

    @classmethod
    def input_texts(cls, ds, options: dict[str, Any]) -> list[str | None] | None:
        """The class prompt of each example's label ("a radiograph showing a nodule")."""
        if "label" not in ds.column_names or not options.get("prompt") or not options.get("class_names"):
            return None
        feat = ds.features.get("label")
        names = list(getattr(feat, "names", None) or options["class_names"])
        return [options["prompt"].format(v if isinstance(v, str) else names[int(v)]) for v in ds["label"]]

    def answer(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor | None, top: int = 3) -> dict[str, Any]:
        probs = self.logits(backbone, pixels).float().softmax(-1)[0]
        v, i = probs.topk(min(top, len(probs)))
        return {
            "task": self.name,
            "top": [{"class": self.class_names[j], "p": round(float(p), 4)} for p, j in zip(v.tolist(), i.tolist())],
        }

    def __init__(self, backbone, train_data=None, **options: Any):
        check_options(self.name, options, self.OPTIONS)
        super().__init__(backbone, train_data, **options)
        head = options.get("head") or ClassificationOptions.head
        if head not in HEADS:
            raise ConfigError(f"classification head must be one of {', '.join(HEADS)}, got {head!r}")
        names = options.get("class_names") or label_names(train_data)
        if not names:
            raise ConfigError(
                "classification needs class names: a ClassLabel `label` column in the training "
                "data or the class_names option"
            )
        self.class_names = [str(n) for n in names]
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError("class_names has duplicates")
        if options.get("templates") is not None and options.get("prompt"):
            raise ConfigError("give classification a prompt or templates, not both")
        if options.get("templates") is not None:
            self.templates = resolve_templates(options["templates"])
        else:
            prompt = options.get("prompt") or default_prompt(train_data)
            if not isinstance(prompt, str) or prompt.count("{}") != 1:
                raise ConfigError(f"prompt must contain exactly one '{{}}' for the class name, got {prompt!r}")
            self.templates = [prompt]
        self.prompt = self.templates[0]
        self.head_kind = head
        self.prompts = [self.prompt.format(c) for c in self.class_names]
        self.class_tokens = backbone.tokenize(self.prompts)
        # every (class, template) prompt, class-major; the same tensor as class_tokens for one template
        every = [t.format(c) for c in self.class_names for t in self.templates]
        self.ensemble_tokens = self.class_tokens if len(self.templates) == 1 else tokenize_texts(backbone, every)
        check_vocabulary(backbone, self.class_names, self.templates, self.ensemble_tokens)
        if head == "linear":
            with torch.no_grad():
                weight = self.class_embeddings(backbone) * backbone.logit_scale.detach()
            self.head = LinearHead(weight.float().cpu())
        else:
            self.head = nn.Module()

    # --- model ------------------------------------------------------------------------------------
    def class_embeddings(self, backbone) -> torch.Tensor:
        """Normalised text embeddings of the class prompts through the current text tower (C, D); with several
        templates, each class's normalised template embeddings averaged and renormalised."""
        if getattr(self, "_class_features", None) is not None:
            emb = F.normalize(self._class_features.to(device_of(backbone)), dim=-1)
        else:
            emb = backbone.encode_text(self.ensemble_tokens.to(device_of(backbone)), normalize=True)
        if len(self.templates) == 1:
            return emb
        return F.normalize(emb.view(len(self.class_names), len(self.templates), -1).mean(1), dim=-1)

    def logits(self, backbone, pixels: torch.Tensor, class_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, C); `class_emb` (from `class_embeddings`) skips the text forward."""
        image = image_embed(backbone, pixels, normalize=True)
        if self.head_kind == "linear":
            return self.head(image)
        if class_emb is None:
            class_emb = self.class_embeddings(backbone)
        return backbone.logit_scale * image @ class_emb.t()

    # --- Task API ---------------------------------------------------------------------------------
    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        require_columns(self, ds)
        return {"pixels": prepare_pixels(backbone, ds), "labels": self._labels(ds)}

    def cache_features(self, backbone, data, frozen, cache, *, train=False):

        out = dict(data)
        px = out.get("pixels")
        if "vision" in frozen and isinstance(px, LazyImages) and px.augment is None:
            out["pixels"] = cache.images(backbone, px)
        if "text" in frozen and self.head_kind == "text":
            self._class_features = cache.texts(backbone, self.ensemble_tokens)
        return out

    def _labels(self, ds) -> torch.Tensor:
        index = {n: i for i, n in enumerate(self.class_names)}
        raw = list(ds["label"])
        names = label_names(ds)
        out = []
        for v in raw:
            if isinstance(v, str):
                out.append(index.get(v, -1))
            elif v is None:
                out.append(-1)
            elif names is not None:  # map through the dataset's own names (another order is fine)
                out.append(index.get(names[int(v)], -1) if 0 <= int(v) < len(names) else -1)
            else:
                iv = int(v)
                if not 0 <= iv < len(self.class_names):
                    raise DataError(
                        f"label {iv} is outside 0..{len(self.class_names) - 1} ({len(self.class_names)} class names)"
                    )
                out.append(iv)
        return torch.tensor(out, dtype=torch.long)

    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, device_of(backbone))
        logits = self.logits(backbone, batch["pixels"])
        labels = batch["labels"]
        if not bool((labels >= 0).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels, ignore_index=-1)

    def predict(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids of prepared data."""
        preds = []
        device = device_of(backbone)
        with Evaluating(self.head):
            class_emb = self.class_embeddings(backbone) if self.head_kind == "text" else None
            for b in batches({"pixels": data["pixels"]}, batch_size):
                preds.append(self.logits(backbone, b["pixels"].to(device), class_emb).argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    def example_values(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256):
        """Per example: correct (accuracy), and correct grouped by class (per_class_accuracy, a macro mean)."""
        labels = data["labels"]
        correct = (self.predict(backbone, data, batch_size) == labels).float()
        return {"accuracy": (correct, None), "per_class_accuracy": (correct, labels)}

    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
        pred = self.predict(backbone, data, batch_size)
        labels = data["labels"]
        return {
            "accuracy": M.accuracy(pred, labels),
            "per_class_accuracy": M.macro_accuracy(pred, labels, len(self.class_names)),
        }

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["options"] = {**self.options, "class_names": self.class_names, "head": self.head_kind}
        if len(self.templates) > 1:
            meta["options"]["templates"] = list(self.templates)
        else:
            meta["options"]["prompt"] = self.prompt
        return meta
