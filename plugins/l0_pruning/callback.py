"""Lightning glue for L0 structured pruning: configuration, schedule, penalty, logs, state and export."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.plugin import CompressionPlugin, PluginConflictError
from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.l0_pruning.gates import KINDS, STAGES, L0Masks, MaskConfig, MaskShape
from plugins.l0_pruning.shape import (count_params, prunable_params, read_facts, read_shape, shape_dict,
                                      shape_for_fraction, shape_from_dict)
from plugins.l0_pruning.surgery import (MASKS_ATTR, find_text_tower, install_mask_hooks, keep_from_masks,
                                        projector_inner, projector_output, projector_removed, prune_model,
                                         remove_mask_hooks)

METHODS = ("plain", "improved")
# Defaults of the improvement switches per method (None in the constructor means "the method's default").
METHOD_DEFAULTS = {
    "plain": {"mask_scale": 1.0, "hardtanh_ste": False, "ranking_noise": 0.0, "soft_topk": False,
              "alternate_every": 0, "hard_from": 0.0},
    "improved": {"mask_scale": 1e-3, "hardtanh_ste": True, "ranking_noise": 0.05, "soft_topk": True,
                 # Most of the run recovers on the exact masks: at 50% of the GPU base, 0.8 left 1.2 F1 points to
                 # dense where 0.2 left 5.3 (experiments/results/sparsity/README.md, L0 section).
                 "alternate_every": 50, "hard_from": 0.8},
}
IMPROVED_ONLY = ("hardtanh_ste", "ranking_noise", "soft_topk", "alternate_every")


class L0Pruning(CompressionPlugin):
    """Learn which heads, MLP channels, hidden dims and layers of the text tower to remove, then remove them.

    Args:
        target_fraction: share of the text tower's prunable parameters to remove, in (0, 1). The fraction becomes
            a target shape (:func:`plugins.l0_pruning.shape.shape_for_fraction`). Give this or ``target_shape``.
        target_shape: the pruned text config: any of ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``, ``hidden_size`` (absent keys keep the model's value).
        method: ``plain`` (hard-concrete L0 gates with a Lagrangian, Sheared-LLaMA) or ``improved`` (the switches
            below on by default).
        prune_heads: learn attention-head gates (whole KV groups and query heads per group).
        prune_mlp: learn MLP intermediate-channel gates.
        prune_hidden: learn one hidden-dimension mask shared by embeddings, every layer and the LM head.
        prune_layers: learn attention-block and MLP-block gates per layer (layers are removed whole).
        targets: the decoder layers of the text tower (the framework's selection rule); default: the
            ``language_model`` tower's ``GradientCheckpointingLayer`` modules. It must select all of them.
        target_warmup: share of training over which the target moves from the dense size to the final one.
        mask_lr: learning rate of the mask parameters (constant, AdamW); None: 0.05 for ``plain`` (log_alpha
            units per step), ``0.02 * mask_scale`` for ``improved`` (0.02 score units per step: Adam normalises
            gradients, so the score moves ``mask_lr / mask_scale`` per step).
        lagrangian_lr: learning rate of the two Lagrange multipliers (maximised, constant).
        mask_scale: gradient scaling: the learnable parameter lives in ``(0, mask_scale]`` and is divided by
            ``mask_scale`` in the forward; 1 switches it off. > 0.
        hardtanh_ste: gate = hardtanh(score) onto [0, 1] with a straight-through gradient (``improved``); off: the
            hard-concrete stretch-and-clamp of the score.
        ranking_noise: amplitude of the bounded, mean-zero uniform noise added to scores during training
            (``improved``; 0: none). It perturbs the ranking and never samples a binary gate.
        soft_topk: in the prune stage, multiply gates by sigmoid((score - threshold_k) / tau), tau annealed to 0,
            k moving to the target count per layer (``improved``).
        tau: initial soft top-k temperature, in score units (> 0).
        alternate_every: ranking and pruning stages alternate every this many steps (``improved``; 0: rank until
            the target warm-up ends, then prune).
        hard_from: the last share of training runs on the exact 0/1 masks of the target shape, in [0, 1)
            (``improved`` default 0.8: rank and prune in the first 20%, recover on the pruned shape after).
        multiple_of: round hidden and MLP widths derived from ``target_fraction`` to this multiple (>= 1).
        seed: mask initialisation and noise (the same on every rank and after a resume).
        name: log namespace and checkpoint key.

    Raises:
        ValueError: a key out of range, both or neither of ``target_fraction`` / ``target_shape``, an improvement
            switch with ``method: plain``, every unit kind off; in ``transform``: a target shape larger than the
            model or not valid grouped-query attention, or targets that are not a text tower's decoder layers.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.l0_pruning.L0Pruning
              init_args: {target_fraction: 0.5, method: improved, prune_layers: false}
    """

    def __init__(
        self,
        target_fraction: float | None = None,
        target_shape: dict[str, int] | None = None,
        method: str = "improved",
        prune_heads: bool = True,
        prune_mlp: bool = True,
        prune_hidden: bool = True,
        prune_layers: bool = True,
        targets: ModuleSelection | None = None,
        target_warmup: float = 0.5,
        mask_lr: float | None = None,
        lagrangian_lr: float = 0.05,
        mask_scale: float | None = None,
        hardtanh_ste: bool | None = None,
        ranking_noise: float | None = None,
        soft_topk: bool | None = None,
        tau: float = 0.05,
        alternate_every: int | None = None,
        hard_from: float | None = None,
        multiple_of: int = 1,
        seed: int = 0,
        name: str = "l0_pruning",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"L0Pruning.method: must be one of {list(METHODS)}, got {method!r}")
        if (target_fraction is None) == (target_shape is None):
            raise ValueError("L0Pruning.target_fraction / target_shape: give exactly one of them")
        if target_fraction is not None and not 0.0 < target_fraction < 1.0:
            raise ValueError(f"L0Pruning.target_fraction: must be in (0, 1), got {target_fraction}")
        if target_shape is not None and not target_shape:
            raise ValueError("L0Pruning.target_shape: give at least one key, e.g. {intermediate_size: 768}")
        kinds = tuple(k for k, on in zip(KINDS, (prune_heads, prune_mlp, prune_hidden, prune_layers)) if on)
        if not kinds:
            raise ValueError("L0Pruning.prune_heads/prune_mlp/prune_hidden/prune_layers: switch at least one on")
        if not 0.0 <= target_warmup <= 1.0:
            raise ValueError(f"L0Pruning.target_warmup: must be in [0, 1], got {target_warmup}")
        if mask_lr is not None and not mask_lr > 0:
            raise ValueError(f"L0Pruning.mask_lr: must be > 0, got {mask_lr}")
        if not lagrangian_lr > 0:
            raise ValueError(f"L0Pruning.lagrangian_lr: must be > 0, got {lagrangian_lr}")
        if not tau > 0:
            raise ValueError(f"L0Pruning.tau: must be > 0, got {tau}")
        if multiple_of < 1:
            raise ValueError(f"L0Pruning.multiple_of: must be >= 1, got {multiple_of}")
        given = {"mask_scale": mask_scale, "hardtanh_ste": hardtanh_ste, "ranking_noise": ranking_noise,
                 "soft_topk": soft_topk, "alternate_every": alternate_every, "hard_from": hard_from}
        if method == "plain":
            extra = [k for k in IMPROVED_ONLY if given[k] is not None]
            if extra:
                raise ValueError(f"L0Pruning.{extra[0]}: only applies to method: improved")
        switches = {k: METHOD_DEFAULTS[method][k] if v is None else v for k, v in given.items()}
        if not switches["mask_scale"] > 0:
            raise ValueError(f"L0Pruning.mask_scale: must be > 0 (1 switches gradient scaling off), got {mask_scale}")
        if not 0.0 <= switches["ranking_noise"] < 1.0:
            raise ValueError(f"L0Pruning.ranking_noise: must be in [0, 1), got {ranking_noise}")
        if switches["alternate_every"] < 0:
            raise ValueError(f"L0Pruning.alternate_every: must be >= 0, got {alternate_every}")
        if not 0.0 <= switches["hard_from"] < 1.0:
            raise ValueError(f"L0Pruning.hard_from: must be in [0, 1), got {hard_from}")
        self.target_fraction, self.target_shape = target_fraction, dict(target_shape or {})
        self.method, self.kinds = method, kinds
        self.targets = targets or ModuleSelection(include="language_model", types=["GradientCheckpointingLayer"])
        self.mask_lr = mask_lr if mask_lr is not None else (0.05 if method == "plain" else 0.02 * switches["mask_scale"])
        self.lagrangian_lr = lagrangian_lr
        self.multiple_of = multiple_of
        self.mask_config = MaskConfig(kinds=kinds, method=method, tau=tau, target_warmup=target_warmup, seed=seed,
                                      **switches)
        self.name = name
        self.step, self.stage = 0, STAGES[0]
        self.masks: L0Masks | None = None
        self._step_sizes: tuple[torch.Tensor, torch.Tensor] | None = None
        self.full: MaskShape | None = None
        self.goal: MaskShape | None = None
        self._claims: set[str] = set()
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        layers = self.targets.select(model, owner=f"{self.name}.targets")
        text, stack = find_text_tower(model, layers)
        full, facts = read_shape(model.config), read_facts(model, text, stack[0])
        if facts.hidden_follows_heads and ("heads" in self.kinds) != ("hidden" in self.kinds):
            raise ValueError(f"{self.name}.prune_heads/prune_hidden: this model's attention takes head_dim = "
                             "hidden_size / num_attention_heads, so heads and hidden dims are pruned together: set "
                             "both true or both false")
        if self.target_fraction is not None:
            goal = shape_for_fraction(full, facts, self.kinds, self.target_fraction, self.multiple_of)
        else:
            goal = shape_from_dict(full, facts, self.kinds, self.target_shape)
        masks = getattr(model, MASKS_ATTR, None)
        if masks is None:
            device = next(model.parameters()).device
            masks = L0Masks(full, goal, self.mask_config, functools.partial(count_params, full, facts)).to(device)
            masks.train(model.training)
            setattr(model, MASKS_ATTR, masks)
        elif masks.full != full or masks.target != goal:
            raise ValueError(f"{self.name}: the model already carries L0 masks for another shape ({masks.target})")
        install_mask_hooks(model, masks, text, stack)
        self.masks, self.full, self.goal = masks, full, goal
        self._claims = self._claimed(model, text, stack)
        rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(MASKS_ATTR))
        text_full, text_goal = count_params(full, facts), count_params(goal, facts)
        removed_projector = projector_removed(model, full.hidden, goal.hidden) if "hidden" in self.kinds else 0
        self._counts = {"text_params_before": text_full, "text_params_after": text_goal,
                        "prunable_params": prunable_params(full, facts, self.kinds),
                        "params_before": rest, "params_after": rest - (text_full - text_goal) - removed_projector}

    def _claimed(self, model: nn.Module, text: nn.Module, stack: nn.ModuleList) -> set[str]:
        ids = {id(p) for p in stack.parameters()}
        if "hidden" in self.kinds:
            ids |= {id(p) for p in (text.embed_tokens.weight, text.norm.weight)}
            for module in (model.get_output_embeddings(), projector_output(model), projector_inner(model)):
                if module is not None:
                    ids |= {id(p) for p in module.parameters()}
        return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}

    @override
    def claims(self, model: nn.Module) -> set[str]:
        return set(self._claims)

    @override
    def check_compatible(self, others: list[CompressionPlugin]) -> None:
        for other in others:
            if isinstance(other, L0Pruning):
                raise PluginConflictError(f"{self.name!r} and {other.name!r}: one L0Pruning per model (they would "
                                          "share the model's masks); put every unit kind into one of them")

    # ------------------------------------------------------------------ training objective
    @override
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        masks = self._require_masks()
        scores = {"params": [getattr(masks, k) for k in self.kinds], "weight_decay": 0.0, "lr_schedule": False}
        if self.mask_lr is not None:
            scores["lr"] = self.mask_lr
        multipliers = {"params": [masks.lambda1, masks.lambda2], "lr": self.lagrangian_lr, "weight_decay": 0.0,
                       "maximize": True, "lr_schedule": False}
        return [scores, multipliers]

    @override
    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        masks = self._require_masks()
        if masks.stage == "hard":
            return {}
        expected, target = masks.expected_params(), masks.target_params()
        self._step_sizes = (expected.detach(), target)  # logged after the step, not computed twice
        return {"lagrangian": masks.lagrangian(expected, target, float(self._counts["prunable_params"]))}

    # ------------------------------------------------------------------ training hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        masks = self._require_masks()
        masks.step, masks.total_steps = trainer.global_step, max(1, int(trainer.estimated_stepping_batches))
        self.step, self.stage = masks.step, masks.stage
        self._step_sizes = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        masks = self._require_masks()
        # The gates and multipliers are model parameters: under FSDP, shards outside forward; gather them.
        with full_parameters(trainer, writeback=True), torch.no_grad():
            if self.method == "improved":  # keep each parameter in its range [0, mask_scale]
                for kind in self.kinds:
                    getattr(masks, kind).clamp_(0.0, self.mask_config.mask_scale)
            # Tensors, not floats: logged every step without waiting for the device (see log_metric).
            # The sizes the step's Lagrangian used; on exact masks (no Lagrangian) both are the target shape's.
            expected, target = self._step_sizes or (masks.shape_params()[1],) * 2
            self.log_metric(pl_module, "expected_params", expected)
            self.log_metric(pl_module, "target_params", target)
            self.log_metric(pl_module, "lambda1", masks.lambda1)
            self.log_metric(pl_module, "lambda2", masks.lambda2)
            self.log_metric(pl_module, "stage", float(STAGES.index(masks.stage)))
            self.log_metric(pl_module, "tau", masks.tau)
            self.log_metric(pl_module, "fractional_gates", self.fractional_gates)  # computed only when logged

    def fractional_gates(self) -> torch.Tensor:
        """Share of the current gates strictly between 0 and 1 (wasted parameters if deployed as they are)."""
        current = self._require_masks().current
        if not current:
            return torch.zeros(())
        values = torch.cat([m.detach().flatten() for m in current.values()])
        return ((values > 0) & (values < 1)).float().mean()

    def _require_masks(self) -> L0Masks:
        if self.masks is None:
            raise RuntimeError(f"{self.name}: transform(model) has not run (the module calls it in configure_model)")
        return self.masks

    # ------------------------------------------------------------------ state
    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "method": self.method,
                "target_params": self._counts.get("text_params_after")}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        want = self._counts.get("text_params_after")
        if state.get("method", self.method) != self.method or (
                want is not None and state.get("target_params") not in (None, want)):
            raise ValueError(f"{self.name}: the checkpoint was pruning with method={state.get('method')} toward "
                             f"{state.get('target_params')} parameters, the config says method={self.method} toward "
                             f"{want}; a resumed run must keep method and target")
        self.step, self.stage = int(state.get("step", 0)), str(state.get("stage", STAGES[0]))

    # ------------------------------------------------------------------ results and export
    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        masks = self._require_masks()
        with torch.no_grad():
            was = masks.training
            masks.train(True)
            expected = float(masks.expected_params())
            masks.train(was)
        shape = shape_dict(self.goal)
        return {**self._counts, **{f"kept_{k}": v for k, v in shape.items()}, "expected_params": expected,
                "lambda1": masks.lambda1.item(), "lambda2": masks.lambda2.item(), "method": self.method,
                "stage": masks.stage,
                "removed_fraction": 1 - self._counts["text_params_after"] / self._counts["text_params_before"]}

    @override
    def prepare_export(self, model: nn.Module) -> None:
        masks = getattr(model, MASKS_ATTR, None)
        if masks is None:
            return
        with torch.no_grad():
            keep = keep_from_masks(masks.hard_masks(), masks.full)
        remove_mask_hooks(model)
        delattr(model, MASKS_ATTR)
        prune_model(model, keep)

    @override
    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        meta = {"method": self.method, "kinds": list(self.kinds), "full_shape": shape_dict(self.full),
                "kept_shape": shape_dict(self.goal), **self._counts}
        (directory / f"{self.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [f"{self.name}.json"]
