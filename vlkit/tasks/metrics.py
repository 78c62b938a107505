"""Pure metric functions of the built-in tasks (tensors in, tensors or floats out; no model, no state).

Conventions:
- rates are returned in percent (0-100) as Python floats;
- a target of -1 (an answer or label outside the known set) is a miss for every prediction;
- boxes are (x0, y0, x1, y1) in normalised image coordinates; `cxcywh_to_xyxy` converts head outputs;
- retrieval ranks are 1-based and pessimistic about ties: a gallery item that is not a hit and scores
  *the same* as the best hit is counted as ranked before it, so a constant similarity matrix gets the
  worst recall, never the best.

Duplicate-aware retrieval: every query and every gallery item carries a key (an integer id of its
caption string). A gallery item is a hit for a query when the keys are equal, so with the captions
"a red square" (images 0 and 3) either image answers the query "a red square", and either copy of the
caption answers image 0.
"""

from __future__ import annotations

import torch

EPS = 1e-7
GIOU_EPS = 1e-12  # torchvision adds eps to union and hull; a float32-invisible one keeps GIoU exact


# --- classification -----------------------------------------------------------------------------
def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Percent of `pred == target` (targets of -1 never match). 0.0 for no examples."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    if target.numel() == 0:
        return 0.0
    hits = (pred == target) & (target >= 0)
    return 100.0 * hits.float().mean().item()


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> dict[int, float]:
    """Accuracy (percent) of each class that occurs in `target` (-1 targets are ignored)."""
    pred, target = pred.reshape(-1), target.reshape(-1)
    out: dict[int, float] = {}
    classes = torch.unique(target[target >= 0]).tolist()
    for c in classes:
        if num_classes is not None and c >= num_classes:
            continue
        mask = target == c
        out[int(c)] = 100.0 * (pred[mask] == c).float().mean().item()
    return out


def macro_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in `target` of their accuracy (balanced accuracy), percent."""
    per = per_class_accuracy(pred, target, num_classes)
    return sum(per.values()) / len(per) if per else 0.0


def grouped_accuracy(pred: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """Accuracy (percent) within each group id >= 0 (e.g. a VQA answer type)."""
    pred, target, groups = pred.reshape(-1), target.reshape(-1), groups.reshape(-1)
    out: dict[int, float] = {}
    for g in torch.unique(groups[groups >= 0]).tolist():
        mask = groups == g
        out[int(g)] = accuracy(pred[mask], target[mask])
    return out


# --- retrieval ----------------------------------------------------------------------------------
def retrieval_ranks(sim: torch.Tensor, query_keys: torch.Tensor, gallery_keys: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best hit of each query (rows of `sim`) among the gallery (columns).

    A hit is a gallery item whose key equals the query's key. The rank is 1 + the number of non-hits
    scoring at least as high as the best-scoring hit (ties count against the query). Queries with no
    hit in the gallery get rank `gallery size + 1`, which no recall@k counts.
    """
    if sim.dim() != 2 or sim.shape != (len(query_keys), len(gallery_keys)):
        raise ValueError(
            f"sim must be (queries, gallery) = ({len(query_keys)}, {len(gallery_keys)}), got {tuple(sim.shape)}"
        )
    sim = torch.nan_to_num(sim.float(), nan=float("-inf"))  # a NaN score never helps a query
    hit = query_keys.reshape(-1, 1) == gallery_keys.reshape(1, -1)
    neg_inf = torch.tensor(float("-inf"), device=sim.device)
    best_hit = torch.where(hit, sim, neg_inf).max(dim=1).values
    ahead = ((sim >= best_hit.unsqueeze(1)) & ~hit).sum(dim=1)
    ranks = ahead + 1
    no_hit = ~hit.any(dim=1)
    return torch.where(no_hit, torch.full_like(ranks, sim.shape[1] + 1), ranks)


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    """Percent of queries whose best hit is ranked within the top `k`."""
    if ranks.numel() == 0:
        return 0.0
    return 100.0 * (ranks <= k).float().mean().item()


def string_keys(texts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """An integer key per text (equal strings share one) and the distinct strings in first-seen order."""
    index: dict[str, int] = {}
    keys = [index.setdefault(t, len(index)) for t in texts]
    return torch.tensor(keys, dtype=torch.long), list(index)


# --- boxes (torchvision.ops; boxes are (..., 4), normalised to [0, 1]) -------------------------------
def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_convert

    return box_convert(b, "cxcywh", "xyxy")


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_convert

    return box_convert(b, "xyxy", "cxcywh")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired boxes (..., 4) x (..., 4) -> (...): the paired (diagonal) form of the all-pairs
    `torchvision.ops.box_iou`, without its N x N matrix. Degenerate pairs (zero union) give 0."""
    from torchvision.ops import box_area

    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a.reshape(-1, 4)).reshape(inter.shape) + box_area(b.reshape(-1, 4)).reshape(inter.shape) - inter
    return torch.where(union > 0, inter / union.clamp(min=EPS), torch.zeros_like(union))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of paired boxes, in [-1, 1] (Rezatofighi et al. 2019): 1 - `torchvision.ops.generalized_box_iou_loss`."""
    from torchvision.ops import generalized_box_iou_loss

    return 1.0 - generalized_box_iou_loss(a, b, reduction="none", eps=GIOU_EPS)


def iou_accuracy(iou: torch.Tensor, threshold: float = 0.5) -> float:
    """Percent of predictions with IoU >= threshold."""
    if iou.numel() == 0:
        return 0.0
    return 100.0 * (iou >= threshold).float().mean().item()


def mean_iou(iou: torch.Tensor) -> float:
    """Mean IoU in percent."""
    if iou.numel() == 0:
        return 0.0
    return 100.0 * iou.float().mean().item()
