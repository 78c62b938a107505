"""A training data spec's `shots: k` (k examples per class) and the dataset kind's own options.

`shots` is a key of every data spec in a recipe. Who draws the k examples:

- a dataset kind that declares `shots` among its own options (`coop`: CoOp's protocol) draws them itself, with
  its own `seed` where the spec gives one; where it does not, the recipe's `seed` is passed on for the draw
  (so runs with different seeds see different shots), and `recipe_notes` says so in one line, because the kind
  documents a default seed of its own;
- for any other kind, and for a `mix`, the run draws k per class from the loaded data with the recipe's seed
  (`vlkit.data.api.few_shot`); such a kind's `seed` means what the kind says (e.g. the world's generation seed).

`take_shots(spec, seed)` prepares a spec for loading; `recipe_notes(cfg)` gives the recipe's `note:` lines.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from ..options import option_names
from ..plugins import options_class, registry


def declared_options(kind: str) -> set[str]:
    """The option names a registered dataset kind declares: its `options_cls` dataclass, else its `options`
    list, else its loader's named keyword parameters (an unknown kind: none)."""

    reg = registry("dataset")
    if kind not in reg:
        return set()
    entry = reg.entry(kind)
    cls = options_class(entry)
    if cls is not None:
        return set(option_names(cls))
    if entry.meta.get("options") is not None:
        return set(entry.meta["options"])
    params = inspect.signature(entry.obj).parameters.values()
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_shots(value: Any, key: str = "shots") -> int:
    """`shots` as an integer >= 1 (a ConfigError naming `key` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1 (examples per class), got {value!r}")
    return value


def kind_draws_shots(spec: dict[str, Any]) -> bool:
    """Whether the spec's dataset kind draws `shots` itself (it declares the option)."""
    return "mix" not in spec and isinstance(spec.get("kind"), str) and "shots" in declared_options(spec["kind"])


def take_shots(spec: dict[str, Any], seed: int) -> int | None:
    """Prepare the training data spec `spec` (changed in place) for its `shots`: returns the k the run draws
    from the loaded data with the recipe's seed, or None (no shots, or the kind draws them itself: `spec` keeps
    `shots` and, where the kind takes a seed and the spec gives none, gets the recipe's `seed`)."""
    if spec.get("shots") is None:
        spec.pop("shots", None)
        return None
    check_shots(spec["shots"], "data.train.shots")
    if not kind_draws_shots(spec):
        return spec.pop("shots")
    if "seed" in declared_options(spec["kind"]) and spec.get("seed") is None:
        spec["seed"] = seed
    return None


def _notes_for(spec: Any, key: str, seed: int) -> list[str]:
    if not isinstance(spec, dict) or spec.get("shots") is None:
        return []
    check_shots(spec["shots"], f"{key}.shots")
    if not kind_draws_shots(spec) or "seed" not in declared_options(spec["kind"]) or spec.get("seed") is not None:
        return []
    return [
        f"{key}: {spec['kind']} draws shots={spec['shots']} with the recipe's seed {seed}, not its own "
        f"default; set {key}.seed to choose"
    ]


def recipe_notes(cfg) -> list[str]:
    """One `note:` line per training data spec whose kind's own option the recipe's setting overrides."""
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    notes = _notes_for(plain(cfg.data.train), "data.train", int(cfg.seed))
    for i, t in enumerate(cfg.tasks or []):
        notes += _notes_for(plain(t.data.train), f"tasks[{i}].data.train", int(cfg.seed))
    return notes
