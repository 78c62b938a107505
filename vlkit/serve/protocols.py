"""The contracts between the HTTP layer and the engines it serves, written down once.

`vlkit serve` answers every endpoint through a `ServeBackend` (the torch backend over a backbone and its adapters,
`vlkit.serve.backends.TorchBackend`, or the onnxruntime one over `vlkit export` directories,
`vlkit.serve.onnx_engine.OnnxBackend`). The backend's `runner` answers one batch of `vlkit.serve.engine.Item`s at a
time for the `BatchingEngine`. `tests/test_declarations.py` checks every backend against these protocols.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Runner(Protocol):
    """Answers one batch: a result (a JSON-able dict) or an exception per item, in order."""

    def run(self, items: list[Any]) -> list[Any]: ...


@runtime_checkable
class ServeBackend(Protocol):
    """What the HTTP layer calls on an engine.

    - `name`: "torch" or "onnx" (shown in /v1/health); `spec`: the backbone spec it serves;
    - `preprocess(image)`: one PIL image to the (3, H, W) tensor the model takes; `tokenize(texts)`: (N, L) ids;
    - `check_adapter(adapter, op)`: raise `RequestError` (4xx) when `adapter` (a served name, `auto` or None
      for the bare backbone) cannot answer operation `op` ("embed", "classify", "score", "answer");
    - `prompt_for(adapter)`: the classification prompt template of the adapter's task (one `{}`);
    - `describe()`: the served adapters for /v1/adapters; `count()`: how many;
    - `load(name, path)` / `unload(name)`: hot load and unload (`POST` / `DELETE /v1/adapters/{name}`);
    - `runner`: the `Runner` the batching engine hands each batch to.
    """

    name: str
    runner: Runner

    @property
    def spec(self) -> str: ...

    def preprocess(self, image: Any) -> Any: ...

    def tokenize(self, texts: list[str]) -> Any: ...

    def check_adapter(self, adapter: str | None, op: str) -> None: ...

    def prompt_for(self, adapter: str | None) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    def count(self) -> int: ...

    def load(self, name: str, path: str) -> dict[str, Any]: ...

    def unload(self, name: str) -> None: ...
