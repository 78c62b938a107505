"""The batching engine and the torch runner behind `vlkit serve`.

`BatchingEngine` owns one worker thread. Requests wait in a bounded queue (`queue_size`: more admitted and
unanswered requests than that and `submit` raises `OverloadedError`, answered 429 with Retry-After); the worker
takes the oldest, waits until `max_wait_ms` after it arrived for more, up to `max_batch`, whatever their adapters,
and hands the batch to the runner. A lone request on a server that answers one request at a time (its last batch
held one, finished before this one arrived) runs at once: there is nobody to wait for. Control operations (hot
load / unload) run on the same thread between two batches, so a forward never sees an adapter half loaded.
`close()` answers everything already admitted, then stops.

`TorchRunner` runs a batch in one forward per tower: every image of the batch through `encode_image`, every text
through `encode_text` (image-text pairs through `encode_pair` for joint adapters), with `AdaptedModel.route` sending
each sample through its own adapter (-1: the frozen backbone). Requests for `auto` are routed first by the router of
the route composition. Each request is then answered by its adapter's task (`Task.answer`, as `vlkit compose run`
answers) from the features the batch computed, through `SampleView`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..compose.router import features
from ..errors import ConfigError, OverloadedError, RequestError, VlkitError
from .inputs import AUTO

DEFAULT_PROMPT = "a photo of a {}"


@dataclass
class Item:
    """One request inside the engine."""

    op: str  # embed | classify | score | answer
    adapter: str | None  # served name, AUTO, or None (frozen backbone)
    pixels: Any = None  # (3, S, S) float tensor or None (numpy for the onnx engine)
    tokens: Any = None  # (n, L) token ids or None: embed text, score texts, the question, label prompts
    labels: list[str] | None = None
    top: int = 3
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    resolved: Any = None  # the adapter actually used (after auto)
    feats: dict = field(default_factory=dict)


class Stats:
    """Counters the metrics endpoint reads (updated by the worker)."""

    def __init__(self):
        self.batches = 0
        self.items = 0
        self.batch_sizes: dict[int, int] = {}
        self.forward_seconds = 0.0
        self.recent: deque = deque(maxlen=32)  # (seconds, size) of recent batches


class BatchingEngine:
    def __init__(self, runner, *, max_batch: int = 32, max_wait_ms: float = 5.0, queue_size: int = 256):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ConfigError("max_batch and queue_size must be at least 1 and max_wait_ms at least 0")
        self.runner = runner
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.queue_size = int(queue_size)
        self.queue: deque[Item] = deque()
        self.controls: deque[tuple[Callable, Future]] = deque()
        self.cond = threading.Condition()
        self.pending = 0  # admitted, not answered
        self.running = 0
        self.stopping = False
        self.stats = Stats()
        self.last_end = 0.0  # when the last batch finished
        self.thread = threading.Thread(target=self._loop, name="vlkit-serve-engine", daemon=True)
        self.thread.start()

    # --- submitting ---------------------------------------------------------------------------
    def retry_after(self) -> int:
        recent = list(self.stats.recent)
        per_batch = (sum(s for s, _ in recent) / len(recent)) if recent else 0.05
        waves = math.ceil(max(self.pending, 1) / self.max_batch)
        return max(1, math.ceil(waves * per_batch + self.max_wait))

    def submit(self, item: Item) -> Future:
        with self.cond:
            if self.stopping:
                raise RequestError("the server is shutting down", status=503)
            if self.pending >= self.queue_size:
                raise OverloadedError(
                    f"the queue is full ({self.queue_size} requests waiting; --queue-size)",
                    retry_after=self.retry_after(),
                )
            self.pending += 1
            item.arrived = time.perf_counter()
            self.queue.append(item)
            self.cond.notify_all()
        return item.future

    def control(self, fn: Callable) -> Future:
        """Run `fn()` on the worker thread between batches; its result or exception is the future's."""
        fut: Future = Future()
        with self.cond:
            if self.stopping:
                raise RequestError("the server is shutting down", status=503)
            self.controls.append((fn, fut))
            self.cond.notify_all()
        return fut

    @property
    def depth(self) -> int:
        return len(self.queue)

    # --- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.controls and not self.stopping:
                    self.cond.wait()
                if self.controls:
                    fn, fut = self.controls.popleft()
                    batch = None
                elif self.queue:
                    deadline = self.queue[0].arrived + (self.max_wait if self._company() else 0.0)
                    while len(self.queue) < self.max_batch and not self.stopping and not self.controls:
                        left = deadline - time.perf_counter()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
                    self.running = len(batch)
                else:  # stopping and nothing left
                    return
            if batch is None:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
                continue
            self._run(batch)

    def _company(self) -> bool:
        """Whether the oldest request should wait `max_wait` for others: unless the server runs one request at
        a time (the last batch held one and it ended before this request arrived), where waiting adds latency
        and nothing to batch with."""
        if not self.stats.recent or len(self.queue) > 1:
            return True
        _, size = self.stats.recent[-1]
        return size > 1 or self.last_end > self.queue[0].arrived

    def _run(self, batch: list[Item]) -> None:
        t0 = time.perf_counter()
        try:
            results = self.runner.run(batch)
        except BaseException as exc:  # noqa: BLE001 - a failed forward fails its batch, not the server
            results = [exc] * len(batch)
        dt = time.perf_counter() - t0
        st = self.stats
        st.batches += 1
        st.items += len(batch)
        st.batch_sizes[len(batch)] = st.batch_sizes.get(len(batch), 0) + 1
        st.forward_seconds += dt
        st.recent.append((dt, len(batch)))
        self.last_end = time.perf_counter()
        for item, res in zip(batch, results):
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)
        with self.cond:
            self.pending -= len(batch)
            self.running = 0

    def close(self, timeout: float | None = None) -> None:
        """Answer every admitted request, then stop the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)


# --- the torch runner -------------------------------------------------------------------------
class SampleView:
    """A view of the backbone for one request: the encoders return what the batch computed for it, so a task's
    own `answer` / `logits` run unchanged; other texts (class prompts) go through the request's adapter alone,
    cached. Other attributes are the backbone's."""

    def __init__(self, backbone, item: Item, catalog):
        object.__setattr__(self, "_bb", backbone)
        object.__setattr__(self, "_item", item)
        object.__setattr__(self, "_catalog", catalog)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_bb"), name)

    @staticmethod
    def _norm(x, normalize):
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels, normalize: bool = False):
        f = self._item.feats
        return self._norm(f["pair"][0] if "pair" in f else f["image"], normalize)

    def encode_text(self, tokens, normalize: bool = False):
        f = self._item.feats
        if tokens is self._item.tokens or (
            self._item.tokens is not None
            and tokens.shape == self._item.tokens.shape
            and torch.equal(tokens.cpu(), self._item.tokens.cpu())
        ):
            return self._norm(f["pair"][1] if "pair" in f else f["text"], normalize)
        return self._norm(self._catalog.text_features(self._item.resolved, tokens, key=id(tokens)), normalize)

    def encode_pair(self, pixels, tokens, normalize: bool = True):
        return self.encode_image(pixels, normalize), self.encode_text(tokens, normalize)


ROUTED = "__routed__"


class TorchRunner:
    def __init__(self, catalog):
        self.catalog = catalog
        self.backbone = catalog.backbone
        self.device = catalog.device or torch.device("cpu")

    # --- auto ---------------------------------------------------------------------------------
    def _route_auto(self, items: list[Item]) -> None:

        router = self.catalog.router
        if router is None:
            for it in items:
                it.resolved = RequestError(
                    "adapter 'auto' needs a route composition (vlkit compose A,B --mode "
                    "route) among --adapters; none is loaded"
                )
            return
        groups: dict[tuple[bool, bool], list[Item]] = {}
        for it in items:
            use_text = it.op in ("answer",) or (it.op == "embed" and it.pixels is None)
            groups.setdefault((it.pixels is not None, use_text), []).append(it)
        for (has_px, has_tok), group in groups.items():
            px = torch.stack([it.pixels for it in group]).to(self.device) if has_px else None
            tok = torch.cat([it.tokens[:1] for it in group]).to(self.device) if has_tok else None
            idx = router.predict(features(self.backbone, px, tok)).tolist()
            for it, i in zip(group, idx):
                it.resolved = router.names[i]

    # --- forwards -----------------------------------------------------------------------------
    def _forward(self, key, group: list[Item]) -> None:
        bb, cat = self.backbone, self.catalog
        img_px, img_owner, txt_tok, txt_owner, pair_px, pair_tok, pair_owner = [], [], [], [], [], [], []
        for it in group:
            entry = cat.entries.get(it.resolved) if it.resolved is not None else None
            joint = it.op in ("score", "answer") and entry is not None and entry.joint
            if joint:
                n = len(it.tokens)
                pair_px.append(it.pixels.unsqueeze(0).expand(n, *it.pixels.shape))
                pair_tok.append(it.tokens)
                pair_owner.append((it, n))
                continue
            if it.pixels is not None:
                img_px.append(it.pixels.unsqueeze(0))
                img_owner.append((it, 1))
            if it.tokens is not None:
                txt_tok.append(it.tokens)
                txt_owner.append((it, len(it.tokens)))

        def run(fn, inputs, owners, store):
            if not owners:
                return
            route = [o.resolved for o, n in owners for _ in range(n)]
            names = list(dict.fromkeys(r for r in route if r is not None))
            if key is not ROUTED:
                cat.activate(key)
            elif len(names) <= 1 and all(r is not None for r in route) or not names:
                cat.activate(names[0] if names else None)
            else:
                cat.model.set_adapter()
                cat.model.route(names, [names.index(r) if r is not None else -1 for r in route])
            try:
                out = fn(*[torch.cat(x).to(self.device) for x in inputs])
            finally:
                cat.activate(None)
            start = 0
            for o, n in owners:
                store(o, out, start, n)
                start += n

        with torch.no_grad():
            run(
                lambda px: bb.encode_image(px),
                [img_px],
                img_owner,
                lambda o, out, s, n: o.feats.__setitem__("image", out[s : s + n]),
            )
            run(
                lambda tok: bb.encode_text(tok),
                [txt_tok],
                txt_owner,
                lambda o, out, s, n: o.feats.__setitem__("text", out[s : s + n]),
            )
            run(
                lambda px, tok: bb.encode_pair(px, tok, normalize=False),
                [pair_px, pair_tok],
                pair_owner,
                lambda o, out, s, n: o.feats.__setitem__("pair", (out[0][s : s + n], out[1][s : s + n])),
            )

    def run(self, items: list[Item]) -> list[Any]:
        auto = [it for it in items if it.adapter == AUTO]
        for it in items:
            if it.adapter != AUTO:
                it.resolved = it.adapter
        if auto:
            self._route_auto(auto)
        live = [it for it in items if not isinstance(it.resolved, BaseException)]
        groups: dict[Any, list[Item]] = {}
        for it in live:
            entry = self.catalog.entries.get(it.resolved) if it.resolved is not None else None
            if it.resolved is not None and entry is None:
                it.resolved = self.catalog_error(it.resolved)
                continue
            key = ROUTED if entry is None or entry.routable else it.resolved
            groups.setdefault(key, []).append(it)
        for key, group in groups.items():
            self._forward(key, group)
        out: list[Any] = []  # an answer, or the error of that item
        for it in items:
            if isinstance(it.resolved, BaseException):
                out.append(it.resolved)
                continue
            try:
                out.append(self.answer(it))
            except VlkitError as exc:
                out.append(exc if isinstance(exc, RequestError) else RequestError(str(exc)))
        return out

    def catalog_error(self, name):
        try:
            self.catalog.get(name)
        except RequestError as exc:
            return exc
        return RequestError(f"adapter {name!r} is not loaded", status=404)

    # --- answers ------------------------------------------------------------------------------
    def answer(self, it: Item) -> dict[str, Any]:
        bb = self.backbone
        label = it.resolved if it.resolved is not None else "none"
        who = f"adapter {label!r}" if it.resolved is not None else "the frozen backbone (no adapter)"
        entry = self.catalog.entries.get(it.resolved) if it.resolved is not None else None
        task = entry.task if entry is not None else None
        scale = float(bb.logit_scale)
        f = it.feats
        if it.op == "embed":
            x = f["image"] if it.pixels is not None else f["text"]
            return {"embedding": F.normalize(x, dim=-1)[0].float().cpu().tolist(), "adapter": label}
        if it.op == "score":
            if "pair" in f:
                img, txt = (F.normalize(t, dim=-1) for t in f["pair"])
                s = (img * txt).sum(-1)
            else:
                img, txt = F.normalize(f["image"], dim=-1), F.normalize(f["text"], dim=-1)
                s = (img * txt).sum(-1)
            return {"scores": [round(scale * float(v), 4) for v in s.tolist()], "adapter": label, "joint": "pair" in f}
        view = SampleView(bb, it, self.catalog)
        px = None if it.pixels is None else it.pixels.unsqueeze(0)
        if it.op == "classify":
            if it.labels is not None:
                img, txt = F.normalize(f["image"], dim=-1), F.normalize(f["text"], dim=-1)
                probs = (scale * img @ txt.t()).float().softmax(-1)[0]
                order = probs.argsort(descending=True).tolist()
                top = [{"class": it.labels[j], "p": round(float(probs[j]), 4)} for j in order]
                return {
                    "scores": {it.labels[j]: round(float(probs[j]), 4) for j in range(len(it.labels))},
                    "top": top[: it.top],
                    "adapter": label,
                    "task": None,
                }
            if task is None:
                raise RequestError(f"{who} has no task head to classify with; give `labels`")
            n = len(getattr(task, "class_names", None) or []) or 1000
            with torch.no_grad():
                res = task.answer(view, px, None, max(n, it.top))
            top = res.get("top") or []
            if not top or "class" not in top[0]:
                raise RequestError(
                    f"adapter {label!r} ({task.name}) does not classify images; give `labels`, or "
                    "use the endpoint of its task"
                )
            return {
                "scores": {t["class"]: t["p"] for t in top},
                "top": top[: it.top],
                "adapter": label,
                "task": task.name,
            }
        if it.op == "answer":
            if task is None:
                raise RequestError(f"{who} has no task that answers questions")
            with torch.no_grad():
                try:
                    res = task.answer(view, px, it.tokens, it.top)
                except ConfigError as exc:
                    raise RequestError(f"adapter {label!r} ({task.name}): {exc}") from None
            if "answer" not in res:
                raise RequestError(f"adapter {label!r} ({task.name}) does not answer questions")
            top = res.get("top") or []
            return {
                "answer": res["answer"],
                "scores": {t.get("answer"): t["p"] for t in top},
                "top": top,
                "adapter": label,
                "task": task.name,
            }
        raise RequestError(f"unknown operation {it.op!r}")
