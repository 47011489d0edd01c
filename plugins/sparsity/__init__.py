"""Weight sparsity: unstructured or N:M masks on chosen Linear layers, ramped during training or set in one shot.

:class:`SparsityRamp` prunes gradually on a cubic or linear schedule (Zhu & Gupta 2017, "To prune, or not to
prune"), ranking weights by magnitude or by Wanda's activation-aware score ``|W_ij| * ||X_j||_2`` (Sun et al.
2023), unstructured or towards N:M along the input dimension (NVIDIA's 2:4 sparse tensor cores, Mishra et al.
2021). :class:`OneShotPruning` is the one-shot magnitude / Wanda baseline. Masks are checkpointed buffers, pruned
weights stay exactly zero through training, and export writes the packed weights with their bits per value.
"""

from plugins.sparsity.config import Pattern, parse_pattern
from plugins.sparsity.export import pack_sparse_weights, write_sparse_export
from plugins.sparsity.layer import (
    MASK_BUFFER,
    InputNormStats,
    apply_weight_mask,
    bake_weight_mask,
    follows_nm,
    nm_masks,
    scheduled_sparsity,
    unstructured_masks,
    weight_mask_of,
    weight_score,
)
from plugins.sparsity.oneshot import OneShotPruning
from plugins.sparsity.ramp import SparsityRamp

__all__ = [
    "MASK_BUFFER",
    "InputNormStats",
    "OneShotPruning",
    "Pattern",
    "SparsityRamp",
    "apply_weight_mask",
    "bake_weight_mask",
    "follows_nm",
    "nm_masks",
    "pack_sparse_weights",
    "parse_pattern",
    "scheduled_sparsity",
    "unstructured_masks",
    "weight_mask_of",
    "weight_score",
    "write_sparse_export",
]
