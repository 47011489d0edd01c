"""Lightning glue shared by the ramp and the one-shot pruner: masks on the selected layers, kept exact.

:class:`MaskedLinears` registers a ``weight_mask`` on every selected Linear (or Embedding: a token table's rows
are its channels, pruned by magnitude) in ``transform``, claims those weights (two sparsity plugins on one layer
fail at start-up), keeps pruned weights exactly zero through every optimizer step (gradient masked before the
step, weight re-masked right after it, so AdamW's weight decay and momentum cannot revive them), computes new
masks from scores on request, reports the sparsity reached and exports the baked weights with their packed form
and BPV.

Under FSDP the weights and gradients a hook sees are flat shards while the masks are whole, so every hook that
touches them does it inside :func:`framework.sharding.full_parameters` (a no-op elsewhere): the masks are computed
from the whole weights, identically on every rank, and each rank writes back its shard of the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.plugin import CompressionPlugin
from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.sparsity.config import Pattern, default_targets
from plugins.sparsity.export import write_sparse_export
from plugins.sparsity.layer import (
    COUNT_BUFFER,
    SQ_MEAN_BUFFER,
    add_weight_mask,
    apply_weight_mask,
    bake_weight_mask,
    mask_gradient,
    nm_masks,
    set_weight_mask,
    sparsity_of,
    unstructured_masks,
    weight_mask_of,
    weight_score,
)


class MaskedLinears(CompressionPlugin):
    """Base of the sparsity plugins: selection, masks, exact zeros, summary and export (not used on its own).

    Args:
        targets: which Linear (or Embedding) layers; default: the language model's Linear layers, except the LM head.
        pattern: parsed ``unstructured`` or N:M pattern.
        scope: ``layer``, ``row`` or ``global``.
        score: ``magnitude`` or ``activation``.
        target: the final sparsity the plugin aims at.
        name: log namespace and checkpoint key.
    """

    def __init__(self, targets: ModuleSelection | None, pattern: Pattern, scope: str, score: str, target: float,
                 name: str) -> None:
        self.targets = targets or default_targets()
        self.pattern = pattern
        self.scope = scope
        self.score = score
        self.target = target
        self.name = name
        self.layers: dict[str, nn.Linear] = {}
        self.sparsity = 0.0  # measured at the last mask change (masks change nowhere else)
        self._masked_step = -1

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        layers = self.targets.select(model, owner=f"{self.name}.targets")
        for qualified, layer in layers.items():
            if not isinstance(layer, (nn.Linear, nn.Embedding)):
                raise ValueError(f"{self.name}.targets: {qualified} is a {type(layer).__name__}, expected Linear "
                                 "(or Embedding)")
            if isinstance(layer, nn.Embedding) and self.score == "activation":
                # An embedding's input is token ids: there is no input norm to weigh its weights by.
                raise ValueError(f"{self.name}.targets: {qualified} is an Embedding; activation-aware scores need "
                                 "a Linear's inputs, so prune embeddings by magnitude (a second plugin) or narrow "
                                 "`targets`")
            width = layer.weight.shape[1]
            if self.pattern.is_nm and width % self.pattern.m:
                raise ValueError(
                    f"{self.name}.pattern: {qualified} has {width} inputs, not divisible by M="
                    f"{self.pattern.m} of pattern {self.pattern}; narrow `targets` or choose another M"
                )
        # A weight shared by two modules (tied input and output embeddings) is one tensor: one mask, packed once.
        by_weight: dict[int, tuple[str, nn.Module]] = {}
        for qualified, layer in layers.items():
            by_weight.setdefault(id(layer.weight), (qualified, layer))
        layers = dict(by_weight.values())
        for layer in layers.values():
            add_weight_mask(layer)
            apply_weight_mask(layer)
        self.layers = layers

    @override
    def claims(self, model: nn.Module) -> set[str]:
        return {f"{name}.weight" for name in self.layers}

    # ------------------------------------------------------------------ masks
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: weight_mask_of(layer) for name, layer in self.layers.items()}

    def measure(self) -> float:
        """Share of pruned weights over the selected layers (reads the masks; a device sync)."""
        self.sparsity = sparsity_of(list(self.masks().values())) if self.layers else 0.0
        return self.sparsity

    def reapply_masks(self) -> None:
        """Zero the pruned weights (under FSDP: inside :func:`~framework.sharding.full_parameters`)."""
        for layer in self.layers.values():
            apply_weight_mask(layer)

    def activation_stats(self) -> dict[str, torch.Tensor] | None:
        """Per-layer mean squared inputs from the statistics buffers; ``None`` until every layer has seen data."""
        counts = [getattr(layer, COUNT_BUFFER, None) for layer in self.layers.values()]
        # One read-back for all layers (one per layer was a host-device sync each on a GPU).
        if not counts or any(c is None for c in counts) or int(torch.stack(counts).min()) == 0:
            return None
        return {name: getattr(layer, SQ_MEAN_BUFFER) for name, layer in self.layers.items()}

    @torch.no_grad()
    def update_masks(self, sparsity: float, input_sq_means: dict[str, torch.Tensor] | None = None) -> float:
        """Recompute every mask for ``sparsity`` (unstructured) or the matching share of N:M groups; zero the
        pruned weights. ``input_sq_means`` switches to activation-aware scores. Returns the measured sparsity.
        Under FSDP call it inside :func:`~framework.sharding.full_parameters` with ``writeback``."""
        scores = {name: weight_score(layer.weight, None if input_sq_means is None else input_sq_means[name])
                  for name, layer in self.layers.items()}
        current = self.masks()
        if self.pattern.is_nm:
            fraction = min(1.0, sparsity / self.pattern.sparsity)
            new = nm_masks(scores, self.pattern.n, self.pattern.m, fraction, self.scope, current)
        else:
            new = unstructured_masks(scores, sparsity, self.scope, current)
        for name, layer in self.layers.items():
            set_weight_mask(layer, new[name])
        return self.measure()

    # ------------------------------------------------------------------ keeping pruned weights at zero
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        with full_parameters(trainer, writeback=True, with_grads=True):
            for layer in self.layers.values():
                mask_gradient(layer)

    def needs_remask(self, trainer: pl.Trainer) -> bool:
        """Whether an optimizer step ran since the weights were last re-masked."""
        return trainer.global_step != self._masked_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Runs after the optimizer step: momentum and weight decay may have moved pruned weights; put them back.
        if self.needs_remask(trainer):
            with full_parameters(trainer, writeback=True):
                self.reapply_masks()
            self._masked_step = trainer.global_step

    # ------------------------------------------------------------------ results and export
    config_name = "sparsity"
    index_coding = "auto"  # N:M exports: the smallest coding (see plugins.sparsity.export.pack_sparse_weights)

    @override
    def config_echo(self) -> dict[str, Any]:
        return {"pattern": str(self.pattern), "scope": self.scope, "score": self.score, "target": self.target}

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {"target_sparsity": self.target, "sparsity": self.measure(), "layers": len(self.layers),
                "pattern": str(self.pattern), "scope": self.scope, "score": self.score}

    @override
    def prepare_export(self, model: nn.Module) -> None:
        for name in self.layers:
            layer = model.get_submodule(name)
            bake_weight_mask(layer)

    @override
    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        weights = {}
        for name in self.layers:
            layer = model.get_submodule(name)
            mask = weight_mask_of(layer)
            weight = layer.weight.detach() if mask is None else layer.weight.detach().masked_fill(~mask, 0.0)
            weights[f"{name}.weight"] = weight
        return write_sparse_export(weights, self.pattern, directory, self.name, index_coding=self.index_coding,
                                   extra={"plugin": type(self).__name__, "target_sparsity": self.target},
                                   parameters=sum(p.numel() for p in model.parameters()))
