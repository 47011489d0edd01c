"""Pure-torch part: schedules, importance scores, exact-count masks and the buffers that hold them.

A masked ``nn.Linear`` carries a persistent boolean buffer ``weight_mask`` (same shape as the weight; ``True``
keeps). The weight itself is kept exactly zero wherever the mask is ``False`` (:func:`apply_weight_mask` after
every change and every optimizer step, :func:`mask_gradient` before it), so the layer's own forward already
uses the masked weight and parameter names never change: checkpoints and HF exports keep their keys.

Activation-aware scores (Wanda, Sun et al. 2023) need the mean squared value of each input channel; an
:class:`InputNormStats` forward pre-hook gathers it into the buffers ``input_sq_mean`` and ``input_count``.
Everything here works without Lightning, e.g. from a notebook::

    scores = {name: weight_score(layer.weight) for name, layer in layers.items()}
    masks = unstructured_masks(scores, 0.5, scope="layer")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

MASK_BUFFER = "weight_mask"
SQ_MEAN_BUFFER = "input_sq_mean"
COUNT_BUFFER = "input_count"
_STATS_ATTR = "_sparsity_input_stats"


# ---------------------------------------------------------------------------------------------------- schedule
def scheduled_sparsity(step: int, start_step: int, end_step: int, initial: float, final: float,
                       schedule: str = "cubic") -> float:
    """Target sparsity at optimizer step ``step``.

    0 before ``start_step``; from ``start_step`` to ``end_step`` it rises from ``initial`` to ``final`` either
    linearly or cubically (Zhu & Gupta 2017: ``s_t = s_f + (s_i - s_f) (1 - progress)^3``, fast early, gentle
    late); ``final`` afterwards.
    """
    if step < start_step:
        return 0.0
    progress = min(1.0, (step - start_step) / max(1, end_step - start_step))
    if schedule == "cubic":
        return final + (initial - final) * (1.0 - progress) ** 3
    if schedule == "linear":
        return initial + (final - initial) * progress
    raise ValueError(f"schedule: must be 'cubic' or 'linear', got {schedule!r}")


# ---------------------------------------------------------------------------------------------------- masks on layers
def weight_mask_of(layer: nn.Module) -> torch.Tensor | None:
    return getattr(layer, MASK_BUFFER, None)


def add_weight_mask(layer: nn.Linear) -> torch.Tensor:
    """Register an all-``True`` ``weight_mask`` buffer on ``layer`` unless it has one (e.g. restored); return it."""
    mask = weight_mask_of(layer)
    if mask is None:
        mask = torch.ones_like(layer.weight, dtype=torch.bool)
        layer.register_buffer(MASK_BUFFER, mask, persistent=True)
    elif mask.shape != layer.weight.shape:
        raise ValueError(f"weight_mask has shape {tuple(mask.shape)}, the weight {tuple(layer.weight.shape)}")
    return mask


@torch.no_grad()
def set_weight_mask(layer: nn.Linear, keep: torch.Tensor) -> None:
    """Replace the layer's mask (in place, so references stay valid) and zero the newly pruned weights."""
    mask = add_weight_mask(layer)
    mask.copy_(keep)
    apply_weight_mask(layer)


@torch.no_grad()
def apply_weight_mask(layer: nn.Linear) -> None:
    """Zero the weights the mask prunes (``weight *= mask``)."""
    mask = weight_mask_of(layer)
    if mask is not None:
        layer.weight.mul_(mask)


@torch.no_grad()
def mask_gradient(layer: nn.Linear) -> None:
    """Zero the gradient of pruned weights, so optimizer moments and gradient clipping ignore them."""
    mask = weight_mask_of(layer)
    if mask is not None and layer.weight.grad is not None:
        layer.weight.grad.mul_(mask)


@torch.no_grad()
def bake_weight_mask(layer: nn.Linear) -> None:
    """Write ``weight * mask`` into the weight and remove the mask, statistics buffers and hook."""
    mask = weight_mask_of(layer)
    if mask is not None:
        layer.weight.masked_fill_(~mask, 0.0)
        delattr(layer, MASK_BUFFER)
    InputNormStats.detach(layer)


def sparsity_of(masks: list[torch.Tensor]) -> float:
    """Share of pruned entries over all ``masks`` together."""
    total = sum(m.numel() for m in masks)
    if not total:
        return 0.0
    # One read-back for all layers, not one per layer.
    pruned = torch.stack([m.numel() - m.sum() for m in masks]).sum().item()
    return int(pruned) / total


def follows_nm(tensor: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of the last dim holds at most ``n`` nonzeros (or ``True``s)."""
    if tensor.shape[-1] % m:
        return False
    return bool(((tensor != 0).reshape(-1, m).sum(-1) <= n).all())


# ---------------------------------------------------------------------------------------------------- statistics
class InputNormStats:
    """Forward pre-hook that accumulates the mean squared value of each input channel of a Linear layer.

    Batches are summed into a pending accumulator (a plain attribute, never broadcast by DDP); :func:`fold_stats`
    reduces the pending sums of many layers across ranks in one collective and folds them into the persistent
    buffers ``input_sq_mean`` (float32, ``[in_features]``) and ``input_count`` (int64), identically on every rank.
    Collection runs only while :attr:`enabled` is set and the layer is in training mode or ``calibrating`` is set.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.calibrating = False
        self.pending_sum: torch.Tensor | None = None
        self.pending_count = 0
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, module: nn.Linear, args: tuple) -> None:
        if not self.enabled or not (module.training or self.calibrating):
            return
        x = args[0].detach()
        rows = x.reshape(-1, x.shape[-1])
        sq = torch.linalg.vector_norm(rows, dim=0, dtype=torch.float32).square()
        self.pending_sum = sq if self.pending_sum is None else self.pending_sum + sq
        self.pending_count += rows.shape[0]

    @classmethod
    def attach(cls, layer: nn.Linear) -> InputNormStats:
        """Register the statistics buffers (kept if present) and the hook (once); return the hook object."""
        if getattr(layer, SQ_MEAN_BUFFER, None) is None:
            device = layer.weight.device
            layer.register_buffer(SQ_MEAN_BUFFER, torch.zeros(layer.in_features, device=device), persistent=True)
            layer.register_buffer(COUNT_BUFFER, torch.zeros((), dtype=torch.int64, device=device), persistent=True)
        stats = getattr(layer, _STATS_ATTR, None)
        if stats is None:
            stats = cls()
            stats.handle = layer.register_forward_pre_hook(stats)
            setattr(layer, _STATS_ATTR, stats)
        return stats

    @staticmethod
    def of(layer: nn.Module) -> InputNormStats | None:
        return getattr(layer, _STATS_ATTR, None)

    @staticmethod
    def detach(layer: nn.Module) -> None:
        """Remove the hook and the statistics buffers."""
        stats = getattr(layer, _STATS_ATTR, None)
        if stats is not None:
            if stats.handle is not None:
                stats.handle.remove()
            delattr(layer, _STATS_ATTR)
        for buffer in (SQ_MEAN_BUFFER, COUNT_BUFFER):
            if buffer in layer._buffers:
                delattr(layer, buffer)


@torch.no_grad()
def fold_stats(layers: list[nn.Linear], reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fold every layer's pending input statistics into its buffers.

    Args:
        layers: layers with :class:`InputNormStats` attached.
        reduce: sums a tensor across data-parallel ranks (``None``: single process). Every rank must call this
            with the same layers, so one flat tensor is reduced in one collective.
    """
    if not layers:
        return
    sums, counts = [], []
    for layer in layers:
        stats = InputNormStats.of(layer)
        mean = getattr(layer, SQ_MEAN_BUFFER)
        sums.append(stats.pending_sum.to(torch.float64) if stats.pending_sum is not None
                    else torch.zeros_like(mean, dtype=torch.float64))
        counts.append(float(stats.pending_count))
    device = sums[0].device
    flat = torch.cat([*(s.to(device) for s in sums), torch.tensor(counts, dtype=torch.float64, device=device)])
    if reduce is not None:
        flat = reduce(flat)
    batch_counts = flat[-len(layers):]
    offset = 0
    for index, layer in enumerate(layers):
        stats = InputNormStats.of(layer)
        mean, count = getattr(layer, SQ_MEAN_BUFFER), getattr(layer, COUNT_BUFFER)
        width = mean.numel()
        batch_sum, batch_count = flat[offset: offset + width].to(mean.device), batch_counts[index].to(mean.device)
        offset += width
        total = count.to(torch.float64) + batch_count
        # Running mean: old mean weighted by its count, plus the new sum; unchanged when nothing was seen.
        new = torch.where(total > 0, (mean.to(torch.float64) * count + batch_sum) / total.clamp(min=1), mean.double())
        mean.copy_(new.to(mean.dtype))
        count.copy_(total.to(torch.int64))
        stats.pending_sum, stats.pending_count = None, 0


# ---------------------------------------------------------------------------------------------------- scores
def weight_score(weight: torch.Tensor, input_sq_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight (float32): ``|W_ij|``, or Wanda's ``|W_ij| * ||X_j||_2`` given the inputs'
    mean squares (the norm up to a per-layer constant, which neither per-layer ranking nor the normalised
    global ranking sees)."""
    score = weight.detach().abs().float()
    if input_sq_mean is not None:
        score = score * input_sq_mean.detach().float().clamp(min=0).sqrt()[None, :]
    return score


def normalised(score: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Score divided by its root mean square over the still-kept entries, so layers of different scale compete
    fairly for one global threshold."""
    kept = score if keep is None else score[keep]
    scale = kept.pow(2).mean().sqrt() if kept.numel() else score.new_tensor(0.0)
    return score / torch.where(scale > 0, scale, torch.ones_like(scale))


def kth_smallest(values: torch.Tensor, k: int, by_sort: bool | None = None) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) along the last dimension, kept as a dimension of size 1. On a GPU it
    is read off a sort: CUDA's kthvalue selects within one thread block per slice, slow for a whole weight matrix;
    on a CPU kthvalue's linear-time selection is the faster one. Both give the same value."""
    if by_sort is None:
        by_sort = values.is_cuda
    return values.sort(dim=-1).values[..., k - 1:k] if by_sort else values.kthvalue(k, dim=-1, keepdim=True).values


def lowest_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[rows, n]`` marking exactly the ``k`` smallest entries of each row of ``values`` (ties go to the
    earliest positions): one sort or selection for all rows."""
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= values.shape[1]:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = kth_smallest(values, k)
    below = values < threshold
    ties = values == threshold
    return below | (ties & (ties.cumsum(1) <= k - below.sum(1, keepdim=True)))


def lowest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean tensor marking exactly ``k`` smallest entries of ``values`` (ties go to the earliest positions)."""
    return lowest_k_rows(values.reshape(1, -1), k).reshape(values.shape)


#: Elements ranked in one batched call of :func:`lowest_share_each`; more are split (a GPU sort holds its input,
#: values and int64 indices at once).
_RANK_BATCH_ELEMENTS = 1 << 26


def lowest_share_each(tensors: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """:func:`lowest_k` of every tensor with ``k = round(share * numel)``. Tensors of one shape are ranked together,
    one sort per batch instead of one per tensor (a mask update of a 12-layer model: 7 sorts instead of 84)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), []).append(name)
    lowest = {}
    for (shape, _, _), names in groups.items():
        numel = math.prod(shape)
        rows_per_batch = max(1, _RANK_BATCH_ELEMENTS // max(1, numel))
        for start in range(0, len(names), rows_per_batch):
            batch = names[start:start + rows_per_batch]
            marked = lowest_k_rows(torch.stack([tensors[n].reshape(-1) for n in batch]), round(share * numel))
            lowest.update((n, row.reshape(shape)) for n, row in zip(batch, marked))
    return {name: lowest[name] for name in tensors}


def unstructured_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer",
                       keep: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the lowest-scoring ``round(sparsity * numel)`` weights, per layer or over all layers.

    Args:
        scores: importance per layer (higher keeps).
        sparsity: share to prune, in [0, 1).
        scope: ``layer`` (each layer exactly to ``sparsity``), ``row`` (each output row of each layer exactly to
            ``sparsity``: Wanda's comparison group; a token table's rows are its tokens, so no token loses more than
            its share) or ``global`` (one ranking of normalised scores across layers, exact over their union).
        keep: current masks; the global normalisation uses the still-kept entries.
    """
    if scope == "layer":
        return {name: ~pruned for name, pruned in lowest_share_each(scores, sparsity).items()}
    if scope == "row":
        return {name: ~lowest_k_rows(score.reshape(score.shape[0], -1), round(sparsity * score[0].numel())).reshape(
            score.shape) for name, score in scores.items()}
    names = list(scores)
    flat = torch.cat([normalised(scores[n], None if keep is None else keep[n]).reshape(-1) for n in names])
    pruned = lowest_k(flat, round(sparsity * flat.numel()))
    return dict(zip(names, [~p.reshape(scores[n].shape) for n, p in zip(names, pruned.split(
        [scores[n].numel() for n in names]))]))


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int, fraction: float = 1.0, scope: str = "layer",
             keep: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks where a ``fraction`` of the groups of ``m`` consecutive inputs hold exactly N:M.

    In each group the ``m - n`` lowest scores are the candidates; the groups whose candidates weigh least
    (summed score) are pruned first. ``fraction = 1`` gives the full N:M pattern; intermediate fractions let a
    ramp move smoothly from dense to N:M, and already-pruned groups (their candidates are zeros) stay pruned.

    Raises:
        ValueError: a layer whose last dimension is not divisible by ``m``.
    """
    prune_in_group, costs = {}, {}
    for name, score in scores.items():
        if score.shape[-1] % m:
            raise ValueError(f"{name}: input dimension {score.shape[-1]} is not divisible by M={m}")
        if scope == "global":
            score = normalised(score, None if keep is None else keep[name])
        groups = score.reshape(*score.shape[:-1], score.shape[-1] // m, m)
        lowest = groups.argsort(dim=-1, stable=True)[..., : m - n]
        prune_in_group[name] = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
        costs[name] = groups.gather(-1, lowest).sum(-1)
    if scope == "layer":
        chosen = lowest_share_each(costs, fraction)
    else:
        names = list(costs)
        flat = torch.cat([costs[name].reshape(-1) for name in names])
        picked = lowest_k(flat, round(fraction * flat.numel())).split([costs[name].numel() for name in names])
        chosen = {name: p.reshape(costs[name].shape) for name, p in zip(names, picked)}
    return {name: ~(prune_in_group[name] & chosen[name][..., None]).reshape(scores[name].shape) for name in scores}
