"""Generative vision-language tasks (VL-T5 / VL-Adapter's four): captioning, open-ended VQA, GQA and NLVR2.

Each task writes its input as a prompt with the task prefix (``caption:``, ``vqa: QUESTION``, ``gqa: QUESTION``,
``nlvr: STATEMENT``) and trains the backbone's own teacher-forced loss (`GenerativeBackbone.loss`) on the
target text; `evaluate` generates (greedy or beam search, batched) and scores the text the official way:

- `captioning` (columns `image`, `caption`, optional `references`: a list of captions per image): CIDEr-D
  (primary, `cider`) and BLEU-4 (`bleu4`) as the COCO caption evaluation computes them
  (`vlkit.tasks.caption_metrics`); training targets are one of the references, drawn per epoch and row;
- `vqa-gen` (`image`, `question`, `answer`, optional `answers`: the human answers, usually ten): VQAv2 soft
  accuracy with the official answer normalisation (`vlkit.tasks.answer_metrics`); the target is `answer`;
- `gqa` (`image`, `question`, `answer`): exact match after the same normalisation;
- `nlvr2` (`image_0`, `image_1`, `sentence`, `label`): both images go to the backbone as one example
  ((B, 2, 3, S, S)); the target is "true" or "false", scored by exact match of the generated word.

The tasks have no head (an adapter, or the model itself, does the learning) and refuse a backbone that does not
generate text. Prepared data: `pixels` (a lazy image column, or a lazy set of K image columns), and the text
columns `prompts`, `targets` and `references` (`vlkit.data.pipeline.TextColumn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.images import ImageReader
from ..data.pipeline import LazyImageSets, TextColumn
from ..errors import ConfigError, DataError
from .answer_metrics import exact_match, vqa_accuracy
from .base import Evaluating, Task, batches, check_options, device_of, prepare_pixels, require_columns, to_device
from .caption_metrics import caption_scores

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


@dataclass
class GenerateOptions:
    """The options of a generative task."""

    max_new_tokens: int = 20
    """Longest answer or caption generated at evaluation, in tokens (>= 1)."""
    num_beams: int = 1
    """Beams of the beam search at evaluation; 1: greedy decoding."""
    prefix: str | None = None
    """The task prefix that starts every prompt; None: the task's own (caption:, vqa:, gqa:, nlvr:)."""


def require_generative(backbone, task: str) -> None:
    if getattr(backbone, "kind", None) != "generative":
        spec = getattr(backbone, "spec", None) or type(backbone).__name__
        raise ConfigError(
            f"task {task!r} generates text: it needs a generative backbone (vl:lm=DIR,... or a "
            f"transformers VLM), and {spec} is not one"
        )


class GenerativeTask(Task):
    """What the four generative tasks share: prompts with a prefix, the backbone's loss, generate then score."""

    prefix: ClassVar[str] = ""
    backbone_kind: ClassVar[str] = "generative"
    options_cls = GenerateOptions
    image_columns: ClassVar[tuple[str, ...]] = ("image",)
    choose_target: ClassVar[bool] = False

    def __init__(self, backbone, train_data=None, **options: Any):
        check_options(self.name, options, self.OPTIONS)
        super().__init__(backbone, train_data, **options)
        require_generative(backbone, self.name)
        self.max_new_tokens = int(options.get("max_new_tokens", GenerateOptions.max_new_tokens))
        self.num_beams = int(options.get("num_beams", GenerateOptions.num_beams))
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ConfigError(f"task {self.name!r}: max_new_tokens and num_beams must be >= 1")
        self.task_prefix = str(options.get("prefix") or self.prefix)

    # --- what each task says ----------------------------------------------------------------------
    def prompt(self, text: str | None) -> str:
        return f"{self.task_prefix} {text}".strip() if text else self.task_prefix

    def prompts(self, ds) -> list[str]:
        column = self.text_column
        return [self.prompt(str(t)) for t in ds[column]] if column else [self.prompt(None)] * len(ds)

    def targets(self, ds) -> list:
        """Training targets: a string per row, or a list of strings to draw one from (`choose_target`)."""
        return [str(a) for a in ds["answer"]]

    def references(self, ds) -> list[list[str]]:
        return [[t] for t in self.targets(ds)]

    def score(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        values = self.per_example(predictions, references)
        return {self.metric: 100.0 * sum(values) / len(values) if values else 0.0}

    def per_example(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        return [exact_match(p, refs[0]) for p, refs in zip(predictions, references, strict=True)]

    # --- Task API ---------------------------------------------------------------------------------
    def prepare(self, backbone, ds) -> dict[str, Any]:
        require_columns(self, ds)
        label = getattr(ds, "_vlkit_label", None)
        if len(self.image_columns) == 1:
            pixels = prepare_pixels(backbone, ds, self.image_columns[0])
        else:
            transform = getattr(backbone, "image_transform", None) or backbone.preprocess
            pixels = LazyImageSets(
                [ImageReader(ds, c, label=label) for c in self.image_columns], transform, backbone.image_size
            )
        return {
            "pixels": pixels,
            "prompts": TextColumn(self.prompts(ds)),
            "targets": TextColumn(self.targets(ds), choose=self.choose_target),
            "references": TextColumn(self.references(ds)),
        }

    def loss(self, backbone, batch: dict[str, Any]) -> torch.Tensor:
        batch = to_device(batch, device_of(backbone))
        return backbone.loss(batch["pixels"], list(batch["prompts"]), list(batch["targets"]))

    def generate(self, backbone, data: dict[str, Any], batch_size: int = 256) -> list[str]:
        """The generated text of every row of prepared data, in order."""
        device = device_of(backbone)
        out: list[str] = []
        with Evaluating(self.head):
            for b in batches({"pixels": data["pixels"], "prompts": data["prompts"]}, batch_size):
                out += backbone.generate(
                    b["pixels"].to(device),
                    list(b["prompts"]),
                    max_new_tokens=self.max_new_tokens,
                    num_beams=self.num_beams,
                )
        return [str(t).strip() for t in out]

    def evaluate(self, backbone, data: dict[str, Any], batch_size: int = 256) -> dict[str, float]:
        return self.score(self.generate(backbone, data, batch_size), data["references"].tolist())

    def example_values(self, backbone, data: dict[str, Any], batch_size: int = 256) -> dict[str, Any]:
        preds = self.generate(backbone, data, batch_size)
        values = self.per_example(preds, data["references"].tolist())
        return {self.metric: (torch.tensor(values, dtype=torch.float64), None)}

    def answer(self, backbone, pixels: torch.Tensor, tokens: Any = None, top: int = 3) -> dict[str, Any]:
        """One input's generated text; `tokens` is the input's text itself (a question or statement) or None."""
        text = tokens[0] if isinstance(tokens, (list, tuple)) else tokens
        if text is not None and not isinstance(text, str):
            raise ConfigError(f"task {self.name!r} reads its input text as a string")
        if self.text_column and not text:
            raise ConfigError(f"this adapter's task {self.name!r} needs a {self.text_column}: give it with --text")
        with torch.no_grad():
            out = backbone.generate(
                pixels.to(device_of(backbone)),
                [self.prompt(text)],
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
            )
        return {"task": self.name, "text": str(out[0]).strip()}

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["options"] = {
            **self.options,
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "prefix": self.task_prefix,
        }
        return meta


class CaptioningTask(GenerativeTask):
    name = "captioning"
    metric = "cider"
    prefix = "caption:"
    required = ("image", "caption")
    show_columns = ("caption",)
    choose_target = True
    adapt_default = True

    def targets(self, ds) -> list:
        return self.references(ds)

    def references(self, ds) -> list[list[str]]:
        if "references" not in ds.column_names:
            return [[str(c)] for c in ds["caption"]]
        out = []
        for i, (cap, refs) in enumerate(zip(ds["caption"], ds["references"], strict=True)):
            refs = [str(r) for r in (refs or []) if r is not None] or [str(cap)]
            if not refs[0]:
                raise DataError(f"row {i + 1}: an empty caption")
            out.append(refs)
        return out

    def score(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        return caption_scores(predictions, references)

    def example_values(self, backbone, data: dict[str, Any], batch_size: int = 256) -> dict[str, Any]:
        return {}  # CIDEr's document frequencies come from the whole set: not a mean of independent values


class VqaGenTask(GenerativeTask):
    name = "vqa-gen"
    metric = "accuracy"
    prefix = "vqa:"
    required = ("image", "question", "answer")
    text_column = "question"
    show_columns = ("question", "answer")

    def references(self, ds) -> list[list[str]]:
        if "answers" not in ds.column_names:
            return [[str(a)] * 10 for a in ds["answer"]]
        return [
            [str(x) for x in answers] if answers else [str(a)] * 10
            for a, answers in zip(ds["answer"], ds["answers"], strict=True)
        ]

    def per_example(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        return [vqa_accuracy(p, refs) for p, refs in zip(predictions, references, strict=True)]


class GqaTask(GenerativeTask):
    name = "gqa"
    metric = "accuracy"
    prefix = "gqa:"
    required = ("image", "question", "answer")
    text_column = "question"
    show_columns = ("question", "answer")


def truth_word(value: Any, row: int) -> str:
    """'true' or 'false' from a bool, 0/1 or a word (NLVR2 writes "True"/"False")."""
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return "true"
    if text in FALSE_WORDS:
        return "false"
    raise DataError(f"row {row + 1}: label must be true or false, got {value!r}")


class Nlvr2Task(GenerativeTask):
    name = "nlvr2"
    metric = "accuracy"
    prefix = "nlvr:"
    required = ("image_0", "image_1", "sentence", "label")
    image_columns = ("image_0", "image_1")
    text_column = "sentence"
    show_columns = ("sentence", "label")

    def targets(self, ds) -> list:
        return [truth_word(v, i) for i, v in enumerate(ds["label"])]

    def per_example(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        return [
            float(p.strip().lower().rstrip(".") == refs[0]) for p, refs in zip(predictions, references, strict=True)
        ]
