"""Training-step memory: parameters, gradients, optimiser state and the activations autograd saves.

On CUDA the allocator's peak is exact; on CPU there is no allocator peak to read, so the saved
activations are counted through autograd's saved-tensor hooks (each storage once) and added to the
bytes of parameters, gradients and AdamW state. Both measure one optimisation step of a real batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones.loading import load_backbone
from .jobs import build_task, load_datasets
from .methods import apply_method
from .recipe import plain


def _storage_key(t: torch.Tensor):
    try:
        return (t.untyped_storage().data_ptr(), t.device.type)
    except RuntimeError:
        return (id(t), "other")


def measure_step_memory(cfg, batch_size: int | None = None) -> dict[str, Any]:
    """Bytes used by one training step of recipe `cfg` (method, adapter, task as the recipe says)."""

    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone)
    train_ds, _ = load_datasets(cfg)
    task = build_task(backbone, cfg, train_ds)
    _, trainable = apply_method(backbone, task, cfg, plain(cfg.adapter))
    bs = batch_size or cfg.optim.batch_size
    data = task.prepare(backbone, train_ds.select(range(min(bs, len(train_ds)))))
    backbone.train()
    params = list(trainable.values())
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.Tensor):
            key = _storage_key(t)
            if key not in seen:
                seen[key] = t.untyped_storage().nbytes()
        return t

    cuda = torch.cuda.is_available() and next(backbone.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(backbone, data)
    activations = sum(seen.values())
    if loss.requires_grad:
        loss.backward()
    if opt is not None:
        opt.step()
    param_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    param_bytes += sum(p.numel() * p.element_size() for p in task.head.parameters())
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt_bytes = 0
    if opt is not None:
        for st in opt.state.values():
            opt_bytes += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    out = {
        "parameters": param_bytes,
        "gradients": grad_bytes,
        "optimizer": opt_bytes,
        "activations": activations,
        "total": param_bytes + grad_bytes + opt_bytes + activations,
    }
    if cuda:
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out
