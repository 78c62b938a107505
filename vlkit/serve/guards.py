"""What `vlkit serve` checks of what a client sends, before anything reaches a backend.

- JSON: nested at most `MAX_JSON_DEPTH` levels (a body of 100,000 nested arrays is a 400, not a RecursionError),
  no integer longer than Python converts (a 5,000-digit number is a 400), no string that is not Unicode text
  (a lone surrogate `\ud800`, which no tokenizer takes);
- prompt templates: exactly one `{}` and no other replacement field (`{x}`, `{0}`, `{!r}`, a lone `{`);
- served names: a hot load may not take a name requests already mean something else by (`auto`, the frozen
  backbone's `none` / `backbone` / `frozen`, in any case);
- hot-load paths: taken as sent (a client's `~` is never expanded); with `--adapter-root DIR` a path must resolve
  (symbolic links followed) inside DIR.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import RequestError

MAX_JSON_DEPTH = 32
RESERVED_NAMES = ("auto", "none", "backbone", "frozen")
RUNS_DIR = Path("runs")


def json_depth(data: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of parsed JSON (a scalar: 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_json(data: Any) -> None:
    """RequestError 400 for parsed JSON nested deeper than `MAX_JSON_DEPTH` or holding a lone surrogate."""
    if json_depth(data) > MAX_JSON_DEPTH:
        raise RequestError(f"malformed JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    "malformed JSON body: a string holds a lone surrogate (\\ud800-\\udfff), not Unicode text"
                ) from None


def prompt_problem(text: str) -> str | None:
    """Why `text` is not a prompt template with exactly one `{}` (None when it is one)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        return f"it is not a template ({exc}; write a literal brace as {{{{ or }}}})"
    if len(fields) != 1 or fields[0] != ("", "", None):
        shown = ", ".join("{" + n + (f"!{c}" if c else "") + (f":{s}" if s else "") + "}" for n, s, c in fields)
        return f"it must contain exactly one {{}} and no other field, got {shown or 'none'}"
    return None


def check_prompt(text: str | None) -> str | None:
    """`text` when it is a prompt template with exactly one `{}`; ValueError otherwise (pydantic's 422)."""
    if text is not None:
        why = prompt_problem(text)
        if why is not None:
            raise ValueError(why)
    return text


def check_served_name(name: str, backbone: str | None = None, served=()) -> str:
    """RequestError 409 for a name that requests already use for something else ('auto', the frozen backbone,
    the backbone's spec as `/v1/models` lists it) or that is served already (it would be listed twice)."""
    if name.strip().lower() in RESERVED_NAMES:
        raise RequestError(
            f"the adapter name {name!r} is reserved (requests use {', '.join(RESERVED_NAMES)} for "
            "the router and the frozen backbone); choose another",
            status=409,
        )
    if backbone and name.strip().lower() == str(backbone).lower():
        raise RequestError(
            f"the adapter name {name!r} is the backbone's (GET /v1/models lists it for the frozen "
            "backbone); choose another",
            status=409,
        )
    if name in served:
        raise RequestError(f"an adapter named {name!r} is already loaded; unload it first", status=409)
    return name


def client_path(text: str, root: str | Path | None = None) -> Path:
    """The absolute directory a hot load names: `text` as sent (no `~` expansion); relative paths are taken
    under `root` (else the working directory, else `runs/`). With `root`, the resolved path must lie inside it:
    403 otherwise. A path that cannot be looked at is a 422."""
    if not text or not text.strip() or "\x00" in text:
        raise RequestError("field 'path': give an adapter directory", status=422)
    p = Path(text)
    try:
        if root is not None:
            base = Path(root).resolve()
            full = (p if p.is_absolute() else base / p).resolve()
            if full != base and base not in full.parents:
                raise RequestError(f"field 'path': {text!r} is outside the adapter root (--adapter-root)", status=403)
        else:
            full = p if p.is_absolute() else Path.cwd() / p
            if not p.is_absolute() and not full.exists() and (RUNS_DIR / p).is_dir():
                full = Path.cwd() / RUNS_DIR / p
            full = full.resolve()
        if full.exists():
            full.stat()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:120]
        raise RequestError(f"field 'path': {text[:200]!r} cannot be used: {reason}", status=422) from None
    return full
