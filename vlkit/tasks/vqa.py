"""Visual question answering as classification over a closed answer set.

Columns: `image` (PIL), `question` (str), `answer` (str); optional `answer_type` (colour, shape,
count, yesno_relation, or any other strings) and `domain`. An `answer_id` column is not read: ids
are taken from the answer strings so that data with another answer order still lines up.

Options:
- `answers`: the answer list. Default: the answer set a dataset kind declares for the data's domain(s)
  (`vlkit.data.kinds.domain_defaults`; the world's `answer_set(domain)`), merged in order when there are
  several, else the sorted distinct answers of the training data.
- `hidden`: width of the head's hidden layer (default 64; the head is small on purpose, since the
  trainable share of a backbone with ~1.7M parameters is one of the numbers vlkit reports).

Head: LayerNorm → Linear(3·D, hidden) → GELU → Linear(hidden, answers) over the pair feature
[img, q, img⊙q] of the normalised image and question embeddings from `Backbone.encode_pair` (fused
when a joint adapter is active). The pair feature comes from one method, `pair_features`.
The last layer starts near zero (std 0.01): predictions start close to uniform.

Answers are matched after `strip().lower()`. An eval answer outside the set gets id -1 and counts as
wrong. Prepared tensors: `pixels`, `tokens` (questions), `answer_ids` (N,) long and, when the data has
an `answer_type` column, `answer_types` (N,) long indexing `self.answer_type_names`.

Metrics (percent): `accuracy` (primary) and, with an `answer_type` column, `accuracy_<type>` for
each type present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.kinds import domain_defaults
from ..errors import ConfigError
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

KNOWN_TYPES = ("colour", "shape", "count", "yesno_relation")


def norm_answer(a) -> str:
    return str(a).strip().lower()


def default_answers(ds) -> list[str]:
    """The answer set a dataset kind declares for the data's domain(s) (`vlkit.data.kinds.domain_defaults`,
    e.g. the world's), else the sorted distinct training answers."""

    domains = dataset_domains(ds)
    sets = [(domain_defaults(d) or {}).get("answers") for d in domains]
    if domains and all(sets):  # every domain known: their answers merged in order
        merged: dict[str, None] = {}
        for answers in sets:
            for a in answers or ():
                merged.setdefault(a, None)
        return list(merged)
    if ds is None or "answer" not in ds.column_names:
        return []
    return sorted({norm_answer(a) for a in ds["answer"] if a is not None})


class VqaHead(nn.Module):
    """A small MLP from a pair feature to answer logits."""

    def __init__(self, in_features: int, hidden: int, num_answers: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_answers)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features))))


@dataclass
class VqaOptions:
    """The options of the `vqa` task."""

    answers: list[str] | None = None
    """The closed answer set, no duplicates (matched after strip().lower()); None: the answer set the data's
    dataset kind declares for its domain(s), else the sorted distinct training answers."""
    hidden: int = 64
    """Width of the answer head's hidden layer (>= 1)."""


class VqaTask(Task):
    name = "vqa"
    metric = "accuracy"
    required = ("image", "question", "answer")
    options_cls = VqaOptions
    text_column = "question"
    show_columns = ("question", "answer", "answer_type")

    def answer(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor | None, top: int = 3) -> dict[str, Any]:
        if tokens is None:
            raise ConfigError("this adapter answers questions: give the question with --text")
        probs = self.logits(backbone, pixels, tokens).float().softmax(-1)[0]
        v, i = probs.topk(min(top, len(probs)))
        return {
            "task": self.name,
            "answer": self.answers[int(i[0])],
            "top": [{"answer": self.answers[j], "p": round(float(p), 4)} for p, j in zip(v.tolist(), i.tolist())],
        }

    def __init__(self, backbone, train_data=None, **options: Any):
        check_options(self.name, options, self.OPTIONS)
        super().__init__(backbone, train_data, **options)
        answers = options.get("answers") or default_answers(train_data)
        if not answers:
            raise ConfigError(
                "vqa needs an answer set: the answers option, a world `domain` column or training "
                "data with an `answer` column"
            )
        self.answers = [str(a) for a in answers]
        self.answer_index: dict[str, int] = {}
        for i, a in enumerate(self.answers):
            if norm_answer(a) in self.answer_index:
                raise ConfigError(f"answer {a!r} is in the answer set twice")
            self.answer_index[norm_answer(a)] = i
        self.hidden = int(options.get("hidden", VqaOptions.hidden))
        if self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1, got {self.hidden}")
        self.answer_type_names: list[str] = list(KNOWN_TYPES)
        self.head = VqaHead(self.feature_dim(backbone), self.hidden, len(self.answers))

    # --- model ------------------------------------------------------------------------------------
    def feature_dim(self, backbone) -> int:
        return 3 * backbone.embed_dim

    def pair_features(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The joint image-question feature (B, feature_dim): [img, q, img⊙q] of normalised embeddings.

        The embeddings come from `backbone.encode_pair`: the two encoders run apart, or each tower seeing
        the other when a joint (fusion) adapter is active. The one place the representation is built:
        override it (and `feature_dim`) for another one.
        """
        img, q = backbone.encode_pair(pixels, tokens, normalize=True)
        return torch.cat([img, q, img * q], dim=-1)

    def logits(self, backbone, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.pair_features(backbone, pixels, tokens).float())

    # --- Task API ---------------------------------------------------------------------------------
    def prepare(self, backbone, ds) -> dict[str, torch.Tensor]:
        require_columns(self, ds)
        answers = torch.tensor(
            [self.answer_index.get(norm_answer(a), -1) if a is not None else -1 for a in ds["answer"]], dtype=torch.long
        )
        out = {
            "pixels": prepare_pixels(backbone, ds),
            "tokens": tokenize_texts(backbone, [str(q) for q in ds["question"]]),
            "answer_ids": answers,
        }
        if "answer_type" in ds.column_names:
            ids = []
            for t in ds["answer_type"]:
                if t is None:
                    ids.append(-1)
                    continue
                t = str(t)
                if t not in self.answer_type_names:
                    self.answer_type_names.append(t)
                ids.append(self.answer_type_names.index(t))
            out["answer_types"] = torch.tensor(ids, dtype=torch.long)
        return out

    def loss(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, device_of(backbone))
        logits = self.logits(backbone, batch["pixels"], batch["tokens"])
        target = batch["answer_ids"]
        if not bool((target >= 0).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=-1)

    def predict(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        """Predicted answer ids (index into `self.answers`) of prepared data."""
        device = device_of(backbone)
        preds = []
        with Evaluating(self.head):
            for b in batches({"pixels": data["pixels"], "tokens": data["tokens"]}, batch_size):
                preds.append(self.logits(backbone, b["pixels"].to(device), b["tokens"].to(device)).argmax(-1).cpu())
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    def evaluate(self, backbone, data: dict[str, torch.Tensor], batch_size: int = 256) -> dict[str, float]:
        pred = self.predict(backbone, data, batch_size)
        target = data["answer_ids"]
        out = {"accuracy": M.accuracy(pred, target)}
        if "answer_types" in data:
            for g, acc in M.grouped_accuracy(pred, target, data["answer_types"]).items():
                out[f"accuracy_{self.answer_type_names[g]}"] = acc
        return out

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["options"] = {**self.options, "answers": self.answers, "hidden": self.hidden}
        return meta
