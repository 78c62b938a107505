"""What the HTTP layer needs of an engine: turning inputs into tensors, the catalog and the runner.

`TorchBackend` holds a vlkit backbone with its adapters (`vlkit.serve.catalog`); `OnnxBackend`
(`vlkit.serve.onnx_engine`) holds `vlkit export` directories. Both answer through the same `BatchingEngine`.
"""

from __future__ import annotations

from typing import Any

from ..backbones.loading import load_backbone
from ..errors import RequestError
from .catalog import TorchCatalog
from .engine import DEFAULT_PROMPT, TorchRunner
from .generate_api import OP as GENERATE
from .generate_api import PATH as GENERATE_PATH
from .generate_api import GenerativeRunner, is_generative
from .guards import prompt_problem
from .inputs import AUTO


class TorchBackend:
    name = "torch"

    def __init__(self, backbone: str, adapters=(), device: str | None = None):
        import torch

        dev = torch.device(device) if device else None
        self.backbone = load_backbone(backbone).eval()
        if dev is not None:
            self.backbone.to(dev)
        self.catalog = TorchCatalog(self.backbone, dev)
        self.catalog.add_many(list(adapters) if not isinstance(adapters, str) else adapters)
        self.generative = is_generative(self.backbone)
        self.runner = GenerativeRunner(self.catalog) if self.generative else TorchRunner(self.catalog)

    @property
    def spec(self) -> str:
        return self.backbone.spec

    def preprocess(self, image):
        return self.backbone.preprocess(image)

    def tokenize(self, texts: list[str]):
        return self.backbone.tokenize(list(texts))

    def check_adapter(self, adapter: str | None, op: str) -> None:
        if self.generative != (op == GENERATE):
            raise RequestError(
                f"{self.spec} is a generative backbone: it answers {GENERATE_PATH} only, not /v1/{op}"
                if self.generative
                else f"{GENERATE_PATH} needs a generative backbone; {self.spec} "
                "embeds and scores (use /v1/embed, /v1/classify, /v1/score, /v1/answer)"
            )
        if adapter is None:
            return
        if adapter == AUTO:
            if self.catalog.router is None:
                raise RequestError(
                    "adapter 'auto' needs a route composition (vlkit compose A,B --mode route) "
                    "among --adapters; none is loaded"
                )
            return
        self.catalog.get(adapter)

    def prompt_for(self, adapter: str | None) -> str:
        entry = self.catalog.entries.get(adapter) if adapter not in (None, AUTO) else None
        prompt = getattr(getattr(entry, "task", None), "prompt", None)
        return prompt if isinstance(prompt, str) and prompt_problem(prompt) is None else DEFAULT_PROMPT

    def describe(self) -> dict[str, Any]:
        return self.catalog.describe()

    def count(self) -> int:
        return len(self.catalog.entries)

    def load(self, name: str, path: str) -> dict[str, Any]:
        added = self.catalog.add(path, name=name, adapters_only=True)
        return self.catalog.entries[added[0]].describe()

    def unload(self, name: str) -> None:
        self.catalog.remove(name)
