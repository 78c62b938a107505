"""open_clip backbones: `open_clip:<model or config.json>[@<pretrained tag or local .safetensors>]`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneLoadError, ConfigError, UnknownNameError
from .base import Backbone, Block, Site, as_triple, resolve_module, tokens_site
from .hosts import AdapterHost
from .sequence import SequenceLayout, prompt_site


def _sites_for_block(tower: str, index: int, path: str, block: nn.Module) -> Block | None:
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return None

    attn_m: Any = attn.base if isinstance(attn, AdapterHost) else attn
    mlp_m = mlp.base if isinstance(mlp, AdapterHost) else mlp
    fc1: Any = getattr(mlp_m, "c_fc", None)
    fc2: Any = getattr(mlp_m, "c_proj", None)
    fc1 = fc1.base if isinstance(fc1, AdapterHost) else fc1
    fc2 = fc2.base if isinstance(fc2, AdapterHost) else fc2
    width = fc1.in_features if fc1 is not None else attn_m.embed_dim
    b = Block(tower, index, path, width)
    b.sites["attn"] = Site(tower, index, "attn", f"{path}.attn", f"{path}.attn", "output", width, width)
    if isinstance(attn_m, nn.MultiheadAttention) and attn_m.in_proj_weight is not None:
        for part in ("q", "k", "v", "out"):
            b.sites[f"attn.{part}"] = Site(
                tower, index, f"attn.{part}", f"{path}.attn#{part}", f"{path}.attn", "linear", width, width
            )
    b.sites["mlp"] = Site(tower, index, "mlp", f"{path}.mlp", f"{path}.mlp", "output", width, width)
    if fc1 is not None and fc2 is not None:
        b.sites["mlp.fc1"] = Site(
            tower, index, "mlp.fc1", f"{path}.mlp.c_fc", f"{path}.mlp.c_fc", "linear", fc1.in_features, fc1.out_features
        )
        b.sites["mlp.fc2"] = Site(
            tower,
            index,
            "mlp.fc2",
            f"{path}.mlp.c_proj",
            f"{path}.mlp.c_proj",
            "linear",
            fc2.in_features,
            fc2.out_features,
        )
    return b


FEATURE_TAP = "vlkit_proj"


def _text_owner(model: Any) -> tuple[Any, str]:
    """The module holding the text tower's parts and its path prefix ("text." for CustomTextCLIP)."""
    if hasattr(model, "text") and hasattr(model.text, "transformer"):
        return model.text, "text."
    return model, ""


def feature_tap_paths(model: nn.Module) -> dict[str, str]:
    """Where each tower's final (projected, unnormalised) features pass an identity module: the `proj` sites.

    open_clip applies its projections inline (`pooled @ proj`), so there is no module to wrap; vlkit adds a
    parameter-free `nn.Identity` to each tower (`visual.vlkit_proj`; `transformer.vlkit_proj` or
    `text.vlkit_proj`) and passes the tower's output through it. It holds no tensors, so the state dict, the
    fingerprint and the outputs (the identity returns its input) are those of the plain model."""
    owner, prefix = _text_owner(model)
    text_parent = "text" if prefix else "transformer"
    out = {}
    if hasattr(model, "visual"):
        out["vision"] = f"visual.{FEATURE_TAP}"
    if hasattr(model, text_parent):
        out["text"] = f"{text_parent}.{FEATURE_TAP}"
    return out


def _install_feature_taps(model: nn.Module) -> None:
    for path in feature_tap_paths(model).values():
        parent = model.get_submodule(path.rsplit(".", 1)[0])
        if FEATURE_TAP not in parent._modules:
            parent.add_module(FEATURE_TAP, nn.Identity())


class OpenClipBackbone(Backbone):
    """Any open_clip model with transformer towers (CLIP and CustomTextCLIP)."""

    family = "open_clip"

    def __init__(self, model: nn.Module, spec: str, tokenizer, preprocess_cfg: dict | None = None):
        _install_feature_taps(model)
        super().__init__(model, spec)
        self._tokenizer = tokenizer
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(getattr(model, "context_length", getattr(tokenizer, "context_length", 77)))
        pre = self._preprocess_cfg(preprocess_cfg or {})
        self.mean, self.std = as_triple(pre.mean), as_triple(pre.std)
        self._image_transform = self._build_transform(pre)
        self._short_text = self._text_runs_short()
        self.text_pad_id = self._pad_id() if self._short_text else None

    def _pad_id(self) -> int | None:
        """open_clip's own tokenizer pads with 0; others (hub tokenizers) keep the full length."""
        return 0 if type(self._tokenizer).__name__ == "SimpleTokenizer" else None

    def _text_runs_short(self) -> bool:
        """Whether the text tower can run at a shorter length: a causal mask, pooled at the end-of-text token
        (argmax or eos), no appended class token and no padding mask."""
        owner, _ = _text_owner(self.model)
        pool = getattr(owner, "text_pool_type", getattr(owner, "pool_type", None))
        return (
            all(hasattr(owner, k) for k in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
            and isinstance(getattr(owner, "attn_mask", None), torch.Tensor)
            and pool in ("argmax", "eos")
            and getattr(owner, "cls_emb", None) is None
            and not getattr(owner, "use_pad_mask", False)
        )

    def _encode_text_short(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's text forward at the length of `text`: positions and the causal mask cut to it."""
        from open_clip.transformer import text_global_pool

        m, _ = _text_owner(self.model)
        n = text.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(text).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
        pool = getattr(m, "text_pool_type", getattr(m, "pool_type", "argmax"))
        x = text_global_pool(x, text, pool, eos_token_id=getattr(m, "text_eos_id", getattr(m, "eos_id", None)))
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj

    def _preprocess_cfg(self, cfg: dict):
        """The model's preprocess config (size, mode, mean/std, interpolation, resize mode, fill colour) as
        open_clip's `PreprocessCfg`, open_clip's defaults where `cfg` is silent."""
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        pre = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=self.image_size), cfg))
        size = tuple(pre.size) if isinstance(pre.size, (tuple, list)) else (pre.size,) * 2
        if size != (self.image_size,) * 2:
            raise ValueError(f"preprocess size {pre.size} differs from the vision tower's {self.image_size}")
        return pre

    def _build_transform(self, pre):
        """open_clip's own eval transform of `pre`."""
        from open_clip.transform import image_transform_v2

        return image_transform_v2(pre, is_train=False)

    def _tap(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """A tower's final features through its `proj` site (the identity unless an adapter sits there)."""
        path = feature_tap_paths(self.model).get(tower)
        if path is None:
            return x

        parent, _, leaf = path.rpartition(".")
        module = resolve_module(self.model, parent)._modules.get(leaf)
        return x if module is None else module(x)

    def encode_image(self, pixels, normalize=False):
        features = self._tap("vision", self.model.encode_image(pixels, normalize=False))
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens, normalize=False):
        tokens = self.trim_tokens(tokens)
        short = self._short_text and tokens.shape[1] != self._text_positions()
        raw = self._encode_text_short(tokens) if short else self.model.encode_text(tokens, normalize=False)
        features = self._tap("text", raw)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def _text_positions(self) -> int:
        return int(_text_owner(self.model)[0].positional_embedding.shape[0])

    def encode_image_tokens(self, pixels):
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            raise ConfigError(
                f"the vision tower of {self.spec} ({type(visual).__name__}) does not expose patch tokens",
                hint="dense tasks such as grounding need a ViT vision tower",
            )
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = previous
        return self._tap("vision", pooled), tokens

    def tokenize(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        return int(getattr(self.model.visual, "output_dim", 512))

    @property
    def logit_scale(self):
        return self.model.logit_scale.exp()

    def _text_blocks_path(self) -> str:
        if hasattr(self.model, "text") and hasattr(self.model.text, "transformer"):
            return "text.transformer.resblocks"
        return "transformer.resblocks"

    def blocks(self, tower: str) -> list[Block]:
        if tower == "vision":
            trans = getattr(self.model.visual, "transformer", None)
            path = "visual.transformer.resblocks"
        else:
            path = self._text_blocks_path()
            trans = self.model.text.transformer if path.startswith("text.") else self.model.transformer
        if trans is None or not hasattr(trans, "resblocks"):
            return []
        out = []
        for i, blk in enumerate(trans.resblocks):
            b = _sites_for_block(tower, i, f"{path}.{i}", blk)
            if b is not None:
                out.append(b)
        if self.sequence_layout(tower) is not None:
            for b in out:
                b.sites["prompt"] = prompt_site(tower, b.index, b.path, b.width)
        embed = self._embed_path(tower)
        if out and embed is not None:
            w = out[0].width
            out[0].sites = {"embed": Site(tower, 0, "embed", embed, embed, "output", w, w), **out[0].sites}
            if tower == "text" and embed.endswith("token_embedding"):
                out[0].sites["tokens"] = tokens_site(0, embed, w)
        tap = feature_tap_paths(self.model).get(tower)
        if out and tap is not None:
            d = self.embed_dim
            out[-1].sites["proj"] = Site(tower, out[-1].index, "proj", tap, tap, "output", d, d)
        return out

    def sequence_layout(self, tower: str):
        """Prompt tokens go after the class token (vision; first when the tower has none) or after the
        start-of-text token (text, whose causal mask, with any padding mask, grows with them). Blocks are
        called `block(x, attn_mask=...)`, or positionally `(x, None, None, attn_mask)` under checkpointing."""

        if tower == "vision":
            trans = getattr(self.model.visual, "transformer", None)
            at = 1 if getattr(self.model.visual, "class_embedding", None) is not None else 0
            causal = False
        else:
            owner = self.model.text if self._text_blocks_path().startswith("text.") else self.model
            trans = owner.transformer
            at, causal = 1, getattr(owner, "attn_mask", None) is not None
        if trans is None or not hasattr(trans, "resblocks"):
            return None
        return SequenceLayout(
            insert_at=at,
            batch_first=bool(getattr(trans, "batch_first", False)),
            causal=causal,
            hidden_arg="q_x",
            hidden_index=0,
            mask_arg="attn_mask",
            mask_index=3,
        )

    def _embed_path(self, tower: str) -> str | None:
        """The module whose output is the token sequence entering the tower's first block (after the
        patch embedding, class token, positions and `ln_pre` for vision; the token embedding for text)."""
        if tower == "vision":
            return "visual.ln_pre" if hasattr(self.model.visual, "ln_pre") else None
        owner, prefix = (self.model.text, "text.") if self._text_blocks_path().startswith("text.") else (self.model, "")
        return f"{prefix}token_embedding" if hasattr(owner, "token_embedding") else None

    def tower_prefixes(self):
        text = (
            ("text.",)
            if self._text_blocks_path().startswith("text.")
            else ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
        )
        return {"vision": ("visual.",), "text": text}

    def tokenizer_files(self):
        return {}


def _read_config(cfg_path: Path) -> tuple[dict, dict, bool]:
    """A model config file: a bare architecture (`embed_dim`, `vision_cfg`, `text_cfg`, optional
    `preprocess_cfg`) or the hub layout `{"model_cfg": ..., "preprocess_cfg": ...}` of open_clip_config.json.
    Returns the architecture, the preprocess config and whether the file is a bare architecture only."""
    if not cfg_path.is_file():
        raise BackboneLoadError(f"open_clip model config {cfg_path} does not exist")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise BackboneLoadError(f"open_clip model config {cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BackboneLoadError(f"open_clip model config {cfg_path} is not a JSON object")
    model_cfg = dict(data.get("model_cfg", data))
    preprocess = data.get("preprocess_cfg", model_cfg.pop("preprocess_cfg", None)) or {}
    if not isinstance(preprocess, dict):
        raise BackboneLoadError(f"preprocess_cfg of {cfg_path} is not a JSON object")
    return model_cfg, preprocess, model_cfg == data


def _load_safetensors_into(model: nn.Module, path: Path, spec: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot read checkpoint {path}: {exc}") from None
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if "state_dict" in state:
        state = state["state_dict"]  # type: ignore[assignment]  # a nested state dict, as some trainers save
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise BackboneLoadError(f"checkpoint {path} does not fit {spec}: {str(exc).strip()[:300]}") from None
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing or unexpected:
        raise BackboneLoadError(
            f"checkpoint {path} does not fit {spec}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def load_open_clip(spec: str, device: str | None = None) -> OpenClipBackbone:
    """Build `open_clip:<model>[@<tag or path>]` through open_clip's own registries."""
    import open_clip

    body = spec.split(":", 1)[1] if ":" in spec else spec
    model_name, _, weights = body.partition("@")
    if not model_name:
        raise BackboneLoadError(
            f"backbone spec {spec!r} names no model", hint="e.g. open_clip:ViT-B-32@laion2b_s34b_b79k"
        )
    cfg_path = Path(model_name)
    preprocess: dict = {}
    if model_name.endswith(".json"):
        model_cfg, preprocess, bare = _read_config(cfg_path)
        model_name = cfg_path.stem
        if bare:
            open_clip.add_model_config(cfg_path)
        else:  # add_model_config registers whole files; this one holds more than the architecture
            from open_clip import factory

            factory._MODEL_CONFIGS[model_name] = model_cfg
    elif model_name not in open_clip.list_models():
        raise UnknownNameError("open_clip model", model_name, open_clip.list_models())

    tag = None
    ckpt = None
    if weights:
        looks_like_path = os.sep in weights or weights.endswith((".safetensors", ".bin", ".pt", ".pth"))
        if looks_like_path or Path(weights).exists():
            ckpt = Path(weights)
            if not ckpt.is_file():
                raise BackboneLoadError(f"checkpoint {ckpt} does not exist")
            if ckpt.suffix != ".safetensors":
                raise BackboneLoadError(
                    f"checkpoint {ckpt} is not a .safetensors file; vlkit never unpickles weight files",
                    hint="convert it once with "
                    "safetensors.torch.save_file(torch.load(path, weights_only=True), 'x.safetensors')",
                )
        else:
            tag = weights
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if tag not in tags:
                raise UnknownNameError(f"pretrained tag for open_clip model {model_name}", tag, tags)
    try:
        model = open_clip.create_model(
            model_name, pretrained=tag, device=device or "cpu", force_preprocess_cfg=preprocess or None
        )
    except BackboneLoadError:
        raise
    except Exception as exc:  # network or hub failures surface as many exception types
        if tag is not None:
            raise BackboneLoadError(
                f"could not fetch pretrained weights {model_name}@{tag} ({type(exc).__name__}: {str(exc)[:200]})",
                hint=f"no hub access? download the checkpoint elsewhere and use "
                f"open_clip:{model_name}@/path/to/open_clip_model.safetensors",
            ) from None
        raise BackboneLoadError(f"could not build open_clip model {model_name}: {exc}") from None
    if ckpt is not None:
        _load_safetensors_into(model, ckpt, spec)
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # hf tokenizers need the hub
        raise BackboneLoadError(
            f"could not load the tokenizer of open_clip model {model_name}: {exc}",
            hint="models with hub tokenizers need the tokenizer files cached locally",
        ) from None
    try:
        pcfg = dict(open_clip.get_model_preprocess_cfg(model))
    except Exception:  # older open_clip: constants only
        pcfg = dict(preprocess)
    model.eval()
    try:
        return OpenClipBackbone(model, spec, tokenizer, pcfg)
    except (AssertionError, TypeError, ValueError) as exc:
        raise BackboneLoadError(
            f"invalid preprocess config {pcfg} for open_clip model {model_name}: {exc}",
            hint="interpolation: bicubic or bilinear; resize_mode: shortest, longest or squash",
        ) from None
