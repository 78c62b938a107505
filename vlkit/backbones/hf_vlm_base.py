"""The structure shared by the transformers VLM backbones of `vlkit.backbones.hf_vlm`: where a model keeps its
transformer blocks (`STACKS`) and, inside a block, its attention and MLP (`LAYOUTS`, architecture as data); the
processor's images (`ProcessorImages`); and `HFVLMBackbone`, the base class: loading, teacher-forced scoring,
generation settings and the adapter sites of every tower.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BackboneLoadError
from .base import Block, Site, as_triple, has_module, resolve_module, to_rgb
from .composed import PREFIX_KIND, PREFIX_ROLE, PrefixPoint
from .generative import GenerativeBackbone, target_logprob, token_loss
from .hosts import AdapterHost, linear_params

PREFIX_PATH = "vlkit_prefix"


@dataclass(frozen=True)
class BlockLayout:
    """Where a transformer block keeps its parts, relative to the block (None: absent)."""

    attn: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None
    mlp: str | None = None
    fc1: str | None = None
    fc2: str | None = None
    xattn: str | None = None
    xq: str | None = None
    xk: str | None = None
    xv: str | None = None
    xo: str | None = None
    xkv: str | None = None  # one fused key and value projection of the cross-attention (GPT-2's c_attn)


CLIP_LIKE = BlockLayout("self_attn", "q_proj", "k_proj", "v_proj", "out_proj", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2")
LAYOUTS: dict[str, BlockLayout] = {
    "clip": CLIP_LIKE,
    "vit": BlockLayout("attention", "q_proj", "k_proj", "v_proj", "o_proj", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2"),
    "blip_vision": BlockLayout("self_attn", o="projection", qkv="qkv", mlp="mlp", fc1="mlp.fc1", fc2="mlp.fc2"),
    "llama": BlockLayout(
        "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", mlp="mlp", fc1="mlp.up_proj", fc2="mlp.down_proj"
    ),
    "bert": BlockLayout(
        "attention",
        "self.query",
        "self.key",
        "self.value",
        "output.dense",
        mlp="output",
        fc1="intermediate.dense",
        fc2="output.dense",
        xattn="crossattention",
        xq="self.query",
        xk="self.key",
        xv="self.value",
        xo="output.dense",
    ),
    "bart": BlockLayout(
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        fc1="fc1",
        fc2="fc2",
        xattn="encoder_attn",
        xq="q_proj",
        xk="k_proj",
        xv="v_proj",
        xo="out_proj",
    ),
    "gpt2": BlockLayout(  # Conv1D projections (linear sites through `linear_params`); c_attn fuses q, k, v
        "attn",
        o="c_proj",
        qkv="c_attn",
        mlp="mlp",
        fc1="mlp.c_fc",
        fc2="mlp.c_proj",
        xattn="crossattention",
        xq="q_attn",
        xo="c_proj",
        xkv="c_attn",
    ),
}
"""Block layouts by family; a tower's layout is the first whose attention (and MLP) paths exist in its blocks."""

STACKS = (
    "vision_model.encoder.layers",
    "encoder.layer",
    "encoder.layers",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "model.decoder.layers",
    "transformer.h",
    "layers",
)
"""Where a vision encoder or a causal LM keeps its blocks (relative to the tower's root), tried in order."""


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterHost):
        module = module.base
    return module


def find_stack(root: nn.Module, prefix: str) -> str:
    """The module path (from the model) of the block list under `prefix`."""
    base = resolve_module(root, prefix) if prefix else root
    for cand in STACKS:
        if has_module(base, cand) and isinstance(resolve_module(base, cand), nn.ModuleList):
            return f"{prefix}.{cand}" if prefix else cand
    raise BackboneLoadError(
        f"cannot find the transformer blocks of {type(base).__name__}; known block lists: {', '.join(STACKS)}"
    )


def find_layout(block: nn.Module) -> BlockLayout:
    """The first layout all of whose self-attention and MLP paths exist in `block`."""
    for lay in LAYOUTS.values():
        paths = [
            lay.attn,
            lay.mlp,
            lay.fc1,
            lay.fc2,
            *(f"{lay.attn}.{p}" for p in (lay.q, lay.k, lay.v, lay.o, lay.qkv) if p),
        ]
        if all(has_module(block, p) for p in paths if p):
            return lay
    raise BackboneLoadError(
        f"vlkit does not know the block layout of {type(block).__name__}; known: {', '.join(LAYOUTS)}"
    )


class ProcessorImages:
    """One PIL image through a transformers image processor: its pixels, (3, H, W) float32. The image reaches the
    processor in its own mode where the processor converts modes itself (`do_convert_rgb`, as CLIP's, SigLIP's,
    BLIP's and Idefics3's do), so the pixels are the library's own; a processor that does not (ViT's) gets it made
    RGB by `to_rgb` first, as every vlkit backbone makes it."""

    def __init__(self, processor, **options):
        self.processor = processor
        self.options = options
        self.converts = bool(getattr(processor, "do_convert_rgb", False))

    def __call__(self, image) -> torch.Tensor:
        px = self.processor(images=image if self.converts else to_rgb(image), return_tensors="pt", **self.options)[
            "pixel_values"
        ]
        return px.reshape(-1, *px.shape[-3:])[0].to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.processor).__name__})"


class HFVLMBackbone(GenerativeBackbone):
    """A transformers VLM: the shared loading, structure and scoring; subclasses build the model inputs."""

    family = "hf-vlm"
    stacks: dict[str, str] = {}
    """Tower -> its root module path (the block list is found under it)."""
    projector: tuple[str, ...] = ()
    """Linear layers of the projector (fc1, fc2) and the projector module, or nothing."""
    image_options: dict[str, Any] = {}
    """Options the image processor is called with."""

    def __init__(self, model: nn.Module, spec: str, tokenizer, image_processor, processor=None):
        model.add_module(PREFIX_PATH, PrefixPoint())
        super().__init__(model, spec)
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = image_processor
        self.__dict__["_image_transform"] = ProcessorImages(image_processor, **self.image_options)
        from PIL import Image

        self.image_size = int(self.image_transform(Image.new("RGB", (32, 32))).shape[-1])
        self.mean = as_triple(getattr(image_processor, "image_mean", self.mean))
        self.std = as_triple(getattr(image_processor, "image_std", self.std))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._paths = {t: find_stack(model, root) for t, root in self.stacks.items()}
        self.towers = tuple(
            t for t in ("vision", "projector", "decoder") if t in self._paths or (t == "projector" and self.projector)
        )
        self.tower_aliases = {"lm": ("decoder",), "text": ("decoder",)}

    # --- sequences ----------------------------------------------------------------------------------------
    def _target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(" " + target, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        return list(ids) + [self.eos_id]

    def _pad(self, rows: list[list[int]], left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(n - len(r), n) if left else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(device), mask.to(device)

    def _teacher_forced(self, prompt_ids: list[list[int]], targets: list[str], device):
        """[prompt; target] rows padded on the right (every token at its own position), and the labels: -100 but
        at the target tokens."""
        tgt = [self._target_ids(t) for t in targets]
        ids, mask = self._pad([p + t for p, t in zip(prompt_ids, tgt)], False, device)
        labels = torch.full_like(ids, -100)
        for i, (p, t) in enumerate(zip(prompt_ids, tgt)):
            labels[i, len(p) : len(p) + len(t)] = torch.tensor(t, device=device)
        return ids, mask, labels

    def _scores(self, pixels, prompts, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token logits, their labels): the token logits shifted by one."""
        logits, labels = self._token_logits(pixels, list(prompts), list(targets))
        return logits[:, :-1], labels[:, 1:]

    def loss(self, pixels, prompts, targets) -> torch.Tensor:
        return token_loss(*self._scores(pixels, prompts, targets))

    def sequence_logprob(self, pixels, prompts, targets) -> torch.Tensor:
        return target_logprob(*self._scores(pixels, prompts, targets))

    @abstractmethod
    def _token_logits(self, pixels, prompts, targets) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _decode(self, out: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return sorted({*eos, self.eos_id})

    def _gen_kwargs(self, max_new_tokens: int, num_beams: int, logits: bool = False) -> dict[str, Any]:
        return {
            "max_new_tokens": int(max_new_tokens),
            "num_beams": int(num_beams),
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": self.pad_id,
            "eos_token_id": self._eos_ids(),
            "output_logits": bool(logits),
            "return_dict_in_generate": True,
        }

    @staticmethod
    def _generated(out, cut: int, logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(new ids, raw logits of every step or None) of a `generate` output, its first `cut` ids dropped."""
        return out.sequences[:, cut:], (torch.stack(out.logits, dim=1).float() if logits else None)

    def generate(self, pixels, prompts, *, max_new_tokens: int = 20, num_beams: int = 1) -> list[str]:
        with torch.no_grad():
            ids, _ = self.generate_ids(pixels, list(prompts), max_new_tokens=max_new_tokens, num_beams=num_beams)
        return self._decode(ids)

    # --- export: what the language model's graphs need (see `GenerativeBackbone`) --------------------------
    export_lm = "causal"

    @property
    def generation_config(self):
        """The generation config of the model whose `generate` writes the answers."""
        return self.model.generation_config

    def generation_settings(self) -> dict[str, Any]:
        layers: Any = resolve_module(self.model, self._paths["decoder"])  # a ModuleList
        return {
            "config": self.generation_config,
            "start": None,
            "eos": self._eos_ids(),
            "pad": int(self.pad_id),
            "layers": len(layers),
            "prompt_start": getattr(self, "start_id", None),
        }

    def save_prompt_files(self, directory: str) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        else:
            self.tokenizer.save_pretrained(directory)
            self.image_processor.save_pretrained(directory)

    # --- structure ----------------------------------------------------------------------------------------
    @abstractmethod
    def tower_prefixes(self) -> dict[str, tuple[str, ...]]: ...

    def blocks(self, tower: str) -> list[Block]:
        if tower == "projector":
            return self._projector_blocks()
        if tower not in self._paths:
            return []
        path = self._paths[tower]
        layers: Any = resolve_module(self.model, path)  # a ModuleList
        out = []
        for i in range(len(layers)):
            bpath = f"{path}.{i}"
            block = resolve_module(self.model, bpath)
            lay = find_layout(block)
            b = Block(tower, i, bpath, self._width(tower))
            self._sites(b, lay)
            if tower == "decoder" and i == 0:
                w = self.prefix_width()
                b.sites[PREFIX_ROLE] = Site(tower, 0, PREFIX_ROLE, PREFIX_PATH, PREFIX_PATH, PREFIX_KIND, w, w)
            out.append(b)
        return out

    def _sites(self, b: Block, lay: BlockLayout) -> None:
        w, t, i = b.width, b.tower, b.index

        def linear(role: str, rel: str | None) -> None:
            if rel and has_module(self.model, f"{b.path}.{rel}"):
                lin = linear_params(resolve_module(self.model, f"{b.path}.{rel}"))  # nn.Linear or Conv1D
                if lin is not None:
                    p = f"{b.path}.{rel}"
                    b.sites[role] = Site(t, i, role, p, p, "linear", lin.in_features, lin.out_features)

        def output(role: str, rel: str | None) -> None:
            if rel and has_module(self.model, f"{b.path}.{rel}"):
                p = f"{b.path}.{rel}"
                b.sites[role] = Site(t, i, role, p, p, "output", w, w)

        output("attn", lay.attn)
        for role, rel in (
            ("attn.q", lay.q),
            ("attn.k", lay.k),
            ("attn.v", lay.v),
            ("attn.out", lay.o),
            ("attn.qkv", lay.qkv),
        ):
            linear(role, f"{lay.attn}.{rel}" if rel else None)
        if lay.xattn and has_module(self.model, f"{b.path}.{lay.xattn}"):
            output("xattn", lay.xattn)
            for role, rel in (
                ("xattn.q", lay.xq),
                ("xattn.k", lay.xk),
                ("xattn.v", lay.xv),
                ("xattn.out", lay.xo),
                ("xattn.kv", lay.xkv),
            ):
                linear(role, f"{lay.xattn}.{rel}" if rel else None)
        output("mlp", lay.mlp)
        linear("mlp.fc1", lay.fc1)
        linear("mlp.fc2", lay.fc2)

    def _projector_blocks(self) -> list[Block]:
        if not self.projector:
            return []
        *linears, module = self.projector
        mods: list[Any] = [_unwrap(resolve_module(self.model, p)) for p in linears]  # nn.Linear
        w = mods[-1].out_features
        b = Block("projector", 0, module, w)
        for j, (p, m) in enumerate(zip(linears, mods)):
            role = "mlp.fc1" if j == 0 else "mlp.fc2"
            b.sites[role] = Site("projector", 0, role, p, p, "linear", m.in_features, m.out_features)
        b.sites["mlp"] = Site("projector", 0, "mlp", module, module, "output", w, w)
        return [b]

    def _width(self, tower: str) -> int:
        cfg = self.model.config
        return int(cfg.vision_config.hidden_size if tower == "vision" else cfg.text_config.hidden_size)

    def prefix_width(self) -> int:
        return self._width("decoder")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "architecture": type(self.model).__name__,
            "processor": type(self.processor or self.image_processor).__name__,
        }
