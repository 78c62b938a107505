"""What dataset kinds declare beside their loader (`Entry.meta` of the "dataset" registry), read by name.

A kind may give, for the values of a ``domain`` column its rows carry, task option defaults:
``register("mykind", loader, summary, domain_defaults=fn)`` with ``fn(domain) -> dict | None``
(keys such as ``class_names``, ``prompt``, ``answers``; None for a domain it does not know). The world
plugin registers the kind ``world`` this way, with its domain names and its ``vlkit data`` functions.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..plugins import registry


def kind_meta(kind: str) -> dict[str, Any]:
    """The metadata a dataset kind was registered with (an UnknownNameError for an unknown kind)."""

    return registry("dataset").entry(kind).meta


def kind_function(kind: str, key: str, what: str):
    """A function a dataset kind declares (`key` in its metadata), or a ConfigError saying `what` needs it."""
    fn = kind_meta(kind).get(key)
    if not callable(fn):
        raise ConfigError(f"{what} needs the dataset kind {kind!r} to declare {key!r}, and it does not")
    return fn


def kind_domains(kind: str) -> tuple[str, ...] | None:
    """The domain names a dataset kind declares (None when it declares none)."""
    domains = kind_meta(kind).get("domains")
    return tuple(domains) if domains is not None else None


def domain_defaults(domain: str) -> dict[str, Any] | None:
    """Task option defaults for rows whose ``domain`` column is `domain`: from the first dataset kind that
    knows the domain (None when none does)."""

    for entry in registry("dataset"):
        fn = entry.meta.get("domain_defaults")
        if callable(fn):
            found = fn(domain)
            if found:
                return dict(found)
    return None
