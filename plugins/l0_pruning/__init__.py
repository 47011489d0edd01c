"""L0-regularised structured pruning of the text tower, with physical removal of what is pruned.

Every prunable unit -- attention head (grouped-query aware), MLP channel, hidden dimension, attention/MLP block of
a layer -- gets a learnable gate. ``method: plain`` is hard-concrete L0 (Louizos et al. 2018, "Learning Sparse
Neural Networks through L0 Regularization") with the structured units of CoFi (Xia et al. 2022) and the Lagrangian
that drives the expected size to an exact target shape from Sheared-LLaMA (Xia et al. 2023). ``method: improved``
adds the five fixes of the on-device talk, each a switch: gradient scaling with the mask as a pseudo-input,
hardtanh with a straight-through estimator, bounded ranking noise, a soft top-k that ends in an exact 0/1 mask, and
alternating ranking / pruning stages. At export the pruned units are removed, giving a smaller standard HF model.

The improved formulation, precisely. Each unit ``u`` has a parameter ``m_u`` in ``[0, mask_scale]`` (initialised
to ``mask_scale``, clamped after every step); its score is ``r_u = m_u / mask_scale``, so dL/dm_u =
dL/dr_u / mask_scale (with Adam: an lr multiplier of 1/mask_scale in score units, no separate lr to tune). The gate
``g_u = hardtanh(r_u + eps_u)`` (eps_u ~ U(-ranking_noise, ranking_noise), fresh per step; straight-through
gradient) multiplies the unit's output in the forward: the mask is a pseudo-input of the LM loss, and at r_u = 1
(the start) the forward is the dense model's while dL/dg_u = <dL/dy_u, y_u> is the unit's first-order (Taylor)
importance. In the prune stage the gate is ``g_u * sigmoid((r_u + eps_u - theta_k) / tau)`` with ``theta_k`` half-way
between the k-th and (k+1)-th score of the layer, ``k`` moving to the target count and ``tau`` annealed to 0; the
last ``hard_from`` of training and every evaluation use the exact top-k 0/1 masks of the target shape. Stages
alternate every ``alternate_every`` steps. The Lagrangian ``lambda1 (E - T) + lambda2 (E - T)^2`` on the expected
size ``E`` (gates as keep probabilities) pulls scores down while the loss holds important units up.

Example::

    trainer:
      callbacks:
        - class_path: plugins.l0_pruning.L0Pruning
          init_args: {target_fraction: 0.5, method: improved}
"""

from plugins.l0_pruning.callback import L0Pruning
from plugins.l0_pruning.gates import (L0Masks, MaskConfig, MaskShape, grouped_head_mask, hard_concrete_keep_prob,
                                      hard_concrete_sample, hard_topk, hardtanh_ste, soft_topk)
from plugins.l0_pruning.shape import count_params, read_shape, shape_for_fraction
from plugins.l0_pruning.spec import pruned_spec
from plugins.l0_pruning.surgery import install_mask_hooks, keep_from_masks, prune_model, remove_mask_hooks

__all__ = ["L0Masks", "L0Pruning", "MaskConfig", "MaskShape", "count_params", "grouped_head_mask",
           "hard_concrete_keep_prob", "hard_concrete_sample", "hard_topk", "hardtanh_ste", "install_mask_hooks",
           "keep_from_masks", "prune_model", "pruned_spec", "read_shape", "remove_mask_hooks", "shape_for_fraction",
           "soft_topk"]
