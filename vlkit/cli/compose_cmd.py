"""`vlkit compose`: combine adapters into a composition directory, and run one on inputs.

    vlkit compose A,B[,C] --mode merge|stack|average|parallel|fuse|route|wise|gate -o DIR [options]
    vlkit compose run DIR --image PATH [--text T] [--route auto | --adapter NAME | --task TASK]
    vlkit compose run RUN --image PATH --prompt "caption:" [--max-new-tokens N] [--num-beams K]   (generative backbones)

A, B are adapter directories, names of runs under runs/, or composition directories (their adapters). On a
generative backbone `compose run` takes an adapter or run directory, `a+b` or a composition, and prints the text
it generates for each image and prompt.
"""

from __future__ import annotations

from pathlib import Path

import typer

MODES = ("merge", "stack", "average", "parallel", "fuse", "route", "wise", "gate")
MODE_HELP = " | ".join(MODES)


def _floats(text: str | None) -> list[float] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text!r}") from None


MODE_OPTIONS = {  # option -> the modes it applies to ("run": vlkit compose run DIR)
    "--mode": MODES,
    "-o": MODES,
    "--weights": ("merge", "stack", "average", "parallel"),
    "--method": ("merge",),
    "--rank": ("merge",),
    "--density": ("merge",),
    "--recipe": ("fuse",),
    "--set": ("fuse",),
    "--data": ("route", "fuse", "gate"),
    "--router-steps": ("route",),
    "--per-adapter": ("route",),
    "--image": ("run",),
    "--text": ("run",),
    "--route": ("run",),
    "--adapter": ("run",),
    "--task": ("run",),
    "--backbone": ("route", "fuse", "gate", "run"),
    "--overwrite": MODES,
    "--alpha": ("wise",),
    "--quantile": ("gate",),
    "--score": ("gate",),
    "--prompt": ("run",),
    "--max-new-tokens": ("run",),
    "--num-beams": ("run",),
}


def check_mode_options(mode: str | None, method: str | None, given: dict) -> None:
    """An option that the mode (or merge method) does not use is refused, not ignored."""
    from ..errors import ConfigError

    if mode is None or (mode != "run" and mode not in MODES):
        return  # compose() says what the modes are
    unused = [k for k, v in given.items() if v not in (None, []) and mode not in MODE_OPTIONS[k]]
    if unused:
        where = "vlkit compose run" if mode == "run" else f"--mode {mode}"
        raise ConfigError(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {where}; "
            f"see 'vlkit compose --help' for what each mode takes"
        )
    if mode == "merge" and method in (None, "linear", "task_arithmetic", "ties"):
        extra = [
            k for k in ("--rank", "--density") if given[k] is not None and not (k == "--density" and method == "ties")
        ]
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} {'does' if len(extra) == 1 else 'do'} not apply to merge "
                f"--method {method or 'linear'} (--density: ties; --rank: the variant's own "
                "methods, e.g. svd)"
            )


def register(cli: typer.Typer) -> None:
    @cli.command("compose", context_settings={"allow_interspersed_args": True})
    def compose_cmd(
        sources: str = typer.Argument(..., help="Adapters A,B[,C] (dirs, run names, compositions), or 'run'."),
        target: str | None = typer.Argument(None, help="With 'run': the composition directory."),
        mode: str | None = typer.Option(None, "--mode", "-m", help=MODE_HELP),
        out: Path | None = typer.Option(None, "--out", "-o", help="Composition directory to write."),
        weights: str | None = typer.Option(None, "--weights", "-w", help="Per-adapter weights, e.g. 0.5,0.5."),
        method: str | None = typer.Option(
            None, "--method", help="merge: linear (default) | task_arithmetic | ties | concat | svd (LoRA)."
        ),
        rank: int | None = typer.Option(None, "--rank", help="merge --method svd: target rank."),
        alpha: float | None = typer.Option(
            None, "--alpha", help="wise: the adapter's strength, 0 (frozen backbone) to 1 (the adapter), e.g. 0.5."
        ),
        quantile: float | None = typer.Option(
            None,
            "--quantile",
            help="gate: share of the held-out training inputs allowed outside the threshold (0, the default: none).",
        ),
        score: str | None = typer.Option(
            None, "--score", help="gate: mahalanobis (default: distance to the training images' Gaussian) or nearest."
        ),
        density: float | None = typer.Option(
            None, "--density", help="merge --method ties: share of entries kept (0.2)."
        ),
        recipe: Path | None = typer.Option(None, "--recipe", help="fuse: recipe with task, data, optim."),
        data: list[str] | None = typer.Option(
            None, "--data", help="route: NAME=SPEC per adapter (none=SPEC); gate: NAME=SPEC; fuse: SPEC."
        ),
        set_: list[str] | None = typer.Option(None, "--set", help="fuse: recipe override key=value."),
        router_steps: int | None = typer.Option(None, "--router-steps", help="route: router training steps (300)."),
        per_adapter: int | None = typer.Option(None, "--per-adapter", help="route: examples per adapter (256)."),
        image: list[Path] | None = typer.Option(None, "--image", help="run: input image (repeatable)."),
        text: list[str] | None = typer.Option(None, "--text", help="run: text / question (repeatable)."),
        route: str | None = typer.Option(None, "--route", help="run: 'auto' routes each input by the router."),
        adapter: str | None = typer.Option(None, "--adapter", help="run: use this adapter of the composition."),
        task: str | None = typer.Option(None, "--task", help="run: use the composition's adapter for this task."),
        prompt: list[str] | None = typer.Option(
            None, "--prompt", help="run, generative backbones: the prompt, e.g. 'caption:' (repeatable: one per image)."
        ),
        max_new_tokens: int | None = typer.Option(
            None, "--max-new-tokens", help="run, generative backbones: longest answer in tokens (20)."
        ),
        beams: int | None = typer.Option(
            None, "--num-beams", "--beams", help="run, generative backbones: beam width (1: greedy)."
        ),
        backbone: str | None = typer.Option(
            None, "--backbone", "-b", help="Backbone spec (default: the adapters' own)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Compose adapters (merge, stack, average, parallel, fuse, route, wise, gate) or run a composition."""
        from ..errors import ConfigError
        from .output import console, print_json, table

        given = {
            "--mode": mode,
            "-o": out,
            "--weights": weights,
            "--method": method,
            "--rank": rank,
            "--density": density,
            "--recipe": recipe,
            "--data": data,
            "--set": set_,
            "--router-steps": router_steps,
            "--per-adapter": per_adapter,
            "--image": image,
            "--text": text,
            "--route": route,
            "--adapter": adapter,
            "--task": task,
            "--backbone": backbone,
            "--overwrite": overwrite or None,
            "--alpha": alpha,
            "--quantile": quantile,
            "--score": score,
            "--prompt": prompt,
            "--max-new-tokens": max_new_tokens,
            "--num-beams": beams,
        }
        check_mode_options("run" if sources == "run" else mode, method, given)
        if sources == "run":
            if target is None:
                raise ConfigError(
                    "usage: vlkit compose run DIR --image PATH [--text T] [--route auto | --adapter NAME | --task TASK]"
                )
            res = _run(
                Path(target),
                image,
                text,
                route,
                adapter,
                task,
                backbone,
                {"prompts": prompt, "max_new_tokens": max_new_tokens, "num_beams": beams},
            )
            _print_predictions(res)
            if json_out:
                print_json(res)
            return
        if target is not None:
            raise ConfigError(f"unexpected argument {target!r} (adapters are one comma-separated argument)")
        if mode is None or out is None:
            raise ConfigError("give --mode and -o DIR, e.g. vlkit compose a,b --mode merge -o runs/merged")
        from ..compose.api import compose
        from .progress import TrainProgress

        if mode == "fuse":
            from ..train.fuse import fuse_adapters

            bar = TrainProgress(enabled=not json_out)
            try:
                res = fuse_adapters(
                    sources,
                    out,
                    recipe=recipe,
                    overrides=set_,
                    data=data,
                    backbone=backbone,
                    weights=_floats(weights),
                    progress=bar,
                    overwrite=overwrite,
                )
            finally:
                bar.close()
        else:
            res = compose(
                sources,
                mode,
                out,
                weights=_floats(weights),
                method=method or "linear",
                rank=rank,
                density=0.2 if density is None else density,
                data=data,
                backbone=backbone,
                router_steps=300 if router_steps is None else router_steps,
                n_per_adapter=256 if per_adapter is None else per_adapter,
                overwrite=overwrite,
                alpha=alpha,
                quantile=0.0 if quantile is None else quantile,
                score=score or "mahalanobis",
            )
        console.print(table(f"compose — {res['mode']}", ["", "value"], _summary_rows(res)))
        console.print(f"wrote {res['output_dir']}")
        if json_out:
            print_json(res)


def _print_predictions(res: dict) -> None:
    """`compose run`'s answers, one line per input."""
    from rich.markup import escape

    from .output import console

    for r in res["predictions"]:
        if "text" in r:
            console.print(f"[{r['input']}] adapter {escape(str(r['adapter']))}: {escape(r['text'])}")
            continue
        detail = (
            r.get("answer")
            or r.get("score")
            or ", ".join(f"{t.get('class', t.get('answer'))} {t['p']:.2f}" for t in r.get("top", []))
        )
        console.print(f"[{r['input']}] adapter {r['adapter']} ({r.get('task')}): {detail}")


def _summary_rows(res: dict) -> list[list]:
    """The rows of the table a composition prints."""
    rows = [["mode", res["mode"]], ["adapters", ", ".join(res["adapters"])]]
    if res.get("weights") is not None:
        rows.append(["weights", ", ".join(f"{w:g}" for w in res["weights"])])
    for k in (
        "method",
        "variant",
        "num_parameters",
        "density",
        "svd_relative_error",
        "task",
        "score",
        "fusion_parameters",
    ):
        if res.get(k) is not None:
            rows.append([k, f"{res[k]:.4g}" if isinstance(res[k], float) else res[k]])
    if "routing" in res:
        rep = res["routing"]
        rows.append(["routing accuracy (held out)", f"{rep['heldout_accuracy']:.1f}% (chance {rep['chance']:.1f}%)"])
        for k, v in rep["per_input"].items():
            rows.append([f"  {k} inputs", f"{v:.1f}%"])
    gate = res.get("gate") or {}
    for name, g in (gate.get("per_adapter") or {}).items():
        text = "—" if g["text_threshold"] is None else f"cosine ≥ {g['text_threshold']:.3f}"
        image = (
            f"Mahalanobis² ≤ {g['image_threshold']:.1f}, shrinkage {g['shrinkage']:.3f}"
            if gate.get("score") == "mahalanobis"
            else f"cosine ≥ {g['image_threshold']:.3f}"
        )
        rows.append([f"gate {name}", f"{g['images']} images ({image}); {g['texts']} texts ({text})"])
    return rows


def _run_backbone(path: Path, given: str | None) -> str:
    """The backbone `compose run` loads: --backbone, else the one the composition or adapter was made for."""
    from ..adapters.files import read_adapter_config
    from ..compose.composition import is_composition, read_composition
    from ..compose.resolve import find_source

    if given:
        return given
    found = find_source(str(path))
    if not is_composition(found) and (found / "adapter_config.json").is_file():
        return read_adapter_config(found).get("backbone") or "tiny"
    return read_composition(found).get("backbone") or "tiny"


def _run(path: Path, images, texts, route, adapter, task, backbone_spec, gen: dict | None = None):
    from ..backbones.loading import load_backbone
    from ..compose.predict import generate_with, run_composition
    from ..errors import ConfigError
    from ..imagefile import open_image

    if not images:
        raise ConfigError("vlkit compose run needs at least one --image")
    backbone = load_backbone(_run_backbone(path, backbone_spec)).eval()
    gen = gen or {"prompts": None, "max_new_tokens": None, "num_beams": None}
    generative = getattr(backbone, "kind", None) == "generative"
    given = [
        k
        for k, v in (
            ("--prompt", gen["prompts"]),
            ("--max-new-tokens", gen["max_new_tokens"]),
            ("--num-beams", gen["num_beams"]),
        )
        if v is not None
    ]
    if given and not generative:
        raise ConfigError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to generative backbones; "
            f"{backbone.spec} scores images and texts (use --text)"
        )
    if generative and (texts or route):
        raise ConfigError(
            f"{'--text' if texts else '--route'} does not apply to generative backbone {backbone.spec}: "
            "give --prompt (e.g. 'caption:') and, for a composition, --adapter or --task"
        )
    if generative and not gen["prompts"]:
        raise ConfigError(f"{backbone.spec} is a generative backbone: give --prompt, e.g. --prompt 'caption:'")
    pil = []
    for p in images:
        if not Path(p).is_file():
            raise FileNotFoundError(str(p))
        pil.append(open_image(p))  # in its own mode: the backbone's own transform converts it
    if generative:
        return generate_with(
            backbone,
            str(path),
            pil,
            list(gen["prompts"]),
            adapter=adapter,
            task=task,
            max_new_tokens=20 if gen["max_new_tokens"] is None else gen["max_new_tokens"],
            num_beams=1 if gen["num_beams"] is None else gen["num_beams"],
        )
    return run_composition(backbone, path, pil, list(texts) if texts else None, adapter=adapter, task=task, route=route)
