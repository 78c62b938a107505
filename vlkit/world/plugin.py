"""The embedded world as a built-in plugin, registered through the same hooks as a third-party plugin.

It registers the dataset kind ``world``, the backbone ``tiny`` (pre-trained on the world's photo domain, its
vocabulary the world's) and the world's probes (``synth-attribute-swap``, ``synth-relation-swap``). No
module outside `vlkit.world` imports the world: what the rest of vlkit needs of it travels with the ``world``
dataset kind's registry entry (`Entry.meta`):

- ``domains``, ``tasks``: the names the world knows;
- ``domain_defaults(domain)``: task option defaults for rows whose ``domain`` column is `domain`
  (``class_names``, ``prompt``, ``answers``), or None for a domain the world does not know;
- ``check(domain, task, n, seed, image_size)``, ``generate(domain, task, n, seed=, image_size=)``,
  ``write(ds, out_dir, task)``, ``read(dir)``, ``find_manifest(dir)``, ``contact_sheet(images, captions,
  out, columns=)``: what ``vlkit data generate`` and ``vlkit data show`` run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..hookspecs import hookimpl
from .domains import DOMAINS, TASKS

DEFAULT_WORLD_N = 200


@dataclass
class WorldOptions:
    """The options of the `world` dataset kind (domain and task may come from the source, world:DOMAIN/TASK)."""

    domain: str | None = None
    """The world domain to draw: photo, medical, satellite or sketch."""
    task: str | None = None
    """The task whose columns the rows carry: classification, retrieval, vqa, grounding, winoground, or a
    generative one: captioning, vqa-gen, gqa, nlvr2 (two images per example)."""
    n: int = DEFAULT_WORLD_N
    """Rows to generate (>= 1)."""
    seed: int = 0
    """Generation seed; the validation and test splits add a fixed offset, so splits are disjoint."""
    image_size: int = 64
    """Side in pixels of the generated images."""


def domain_defaults(domain: str) -> dict[str, Any] | None:
    """Task option defaults for data of a world domain (None for a domain the world does not know)."""
    from .domains import answer_set, class_names, class_prompt

    if domain not in DOMAINS:
        return None
    return {"class_names": class_names(domain), "prompt": class_prompt(domain), "answers": answer_set(domain)}


def load_world(
    source: str | None = None,
    *,
    split: str | None = None,
    domain: str | None = None,
    task: str | None = None,
    n: int = DEFAULT_WORLD_N,
    seed: int = 0,
    image_size: int = 64,
    **options: Any,
):
    """The embedded procedural image-text world: ``world:DOMAIN/TASK`` or options domain, task, n, seed."""
    from ..data.loaders import _int_option, _no_extra
    from .tasks import generate

    _no_extra("world", options, WorldOptions)
    if source:
        parts = [p for p in source.strip("/").split("/") if p]
        if len(parts) > 2:
            raise ConfigError(f"world source must be DOMAIN or DOMAIN/TASK, got {source!r}")
        src_domain = parts[0] if parts else None
        src_task = parts[1] if len(parts) > 1 else None
        for what, a, b in (("domain", src_domain, domain), ("task", src_task, task)):
            if a and b and a != b:
                raise ConfigError(f"world:{source} names {what} {a!r} but {what}={b!r} was also given")
        domain, task = domain or src_domain, task or src_task
    if not domain:
        raise ConfigError(f"the world dataset needs a domain; domains: {', '.join(DOMAINS)}")
    if domain not in DOMAINS:
        raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if not task:
        raise ConfigError(f"the world dataset needs a task; tasks: {', '.join(TASKS)}")
    if task not in TASKS:
        raise ConfigError(f"unknown world task {task!r}; tasks: {', '.join(TASKS)}")
    n = _int_option("n", n)
    if n < 1:
        raise ConfigError(f"data option n must be at least 1, got {n}")
    seed = _int_option("seed", seed)
    if split and split not in ("train", "validation", "test"):
        raise ConfigError(f"world split must be train, validation or test, got {split!r}")
    if split in ("validation", "test"):  # disjoint, reproducible samples per split
        seed = seed + {"validation": 1_000_003, "test": 2_000_003}[split]
    ds = generate(domain, task, n, seed=seed, image_size=_int_option("image_size", image_size))
    if task == "winoground":  # the same column types as every other Winoground source
        from ..data.winoground import normalize

        ds = normalize(ds, f"world:{domain}/winoground")
    return ds


def _check(domain: str, task: str, n: int, seed: int, image_size: int) -> None:
    from .tasks import check_args

    check_args(domain, task, n, seed, image_size)


def _generate(domain: str, task: str, n: int, seed: int = 0, image_size: int = 64):
    from .tasks import generate

    return generate(domain, task, n, seed=seed, image_size=image_size)


def _write(ds, out_dir, task: str):
    from .io import write

    return write(ds, out_dir, task)


def _read(out_dir):
    from .io import read

    return read(out_dir)


def _find_manifest(out_dir):
    from .io import find_manifest

    return find_manifest(out_dir)


def _contact_sheet(images, captions, out, columns: int = 4):
    from .render import render_contact_sheet

    return render_contact_sheet(images, captions, out, columns=columns)


def _tiny(spec, device=None):
    from .tiny import load_tiny

    return load_tiny(spec, device=device)


@hookimpl
def register_datasets(register):
    register(
        "world",
        load_world,
        summary="embedded procedural image-text world: world:DOMAIN/TASK (options n, seed, image_size)",
        options_cls=WorldOptions,
        domains=DOMAINS,
        tasks=TASKS,
        domain_defaults=domain_defaults,
        check=_check,
        generate=_generate,
        write=_write,
        read=_read,
        find_manifest=_find_manifest,
        contact_sheet=_contact_sheet,
    )


def _tiny_vl(spec, device=None):
    from .tiny_vl import load_tiny_vl

    return load_tiny_vl(spec, device=device)


@hookimpl
def register_backbones(register):
    register("tiny", _tiny, "built-in tiny CLIP pre-trained on the embedded photo world (tiny[@random|@path])")
    register(
        "tiny-vl",
        _tiny_vl,
        "built-in generative backbone: tiny's image tower + a small T5, pre-trained on the "
        "embedded world's captions and questions (tiny-vl[@init|@random|@path])",
    )


@hookimpl
def register_probes(register):
    from .probes import attribute_swap_probe, relation_swap_probe

    for probe in (attribute_swap_probe(), relation_swap_probe()):
        register(probe.name, probe, summary=probe.summary)
