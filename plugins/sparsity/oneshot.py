"""OneShotPruning: prune once (magnitude or Wanda) and keep the mask fixed; the baselines a ramp must beat."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from typing_extensions import override

from framework.module import model_inputs
from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.sparsity.config import SCORES, check_choice, check_scope, parse_pattern, resolve_sparsity
from plugins.sparsity.layer import SQ_MEAN_BUFFER, InputNormStats, fold_stats
from plugins.sparsity.masking import MaskedLinears


class OneShotPruning(MaskedLinears):
    """Prune the selected Linear layers once, before the first training or evaluation batch, then keep the mask.

    ``magnitude`` ranks weights by ``|W|``; ``activation`` is Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2`` with
    the input norms measured on ``calibration_batches`` training batches run through the model without gradients.
    Pruning happens once, at whichever of fit, validation or test starts first (after any checkpoint restore),
    so ``vlmc validate`` with this callback evaluates "dense model, one-shot pruned". A fit after it keeps the
    pruned weights at exactly zero. A resumed run, or a model whose masks already prune something, is not pruned
    again.

    Args:
        targets: which Linear layers; default: every Linear of the language model except ``lm_head``; token
            tables too (``types: [Linear, Embedding]``) with ``method: magnitude``.
        method: ``magnitude`` or ``activation``.
        sparsity: share of weights pruned, in [0, 1); default 0.5. Implied by an N:M pattern.
        pattern: ``unstructured`` or ``N:M`` (e.g. ``2:4``), along the input dimension.
        scope: ``layer``, ``row`` (each output row of each layer, Wanda's comparison group) or ``global`` (one
            ranking of per-layer normalised scores across the selection).
        calibration_batches: training batches for ``activation`` statistics, >= 1.
        name: log namespace and checkpoint key.

    Raises:
        ValueError: a value outside its range (naming the key); in ``transform``, an input dimension not
            divisible by ``M`` or targets that match nothing; ``activation`` without a datamodule to calibrate on.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.sparsity.OneShotPruning
              init_args: {method: activation, sparsity: 0.5, calibration_batches: 16}
    """

    def __init__(
        self,
        targets: ModuleSelection | None = None,
        method: str = "magnitude",
        sparsity: float | None = None,
        pattern: str = "unstructured",
        scope: str = "layer",
        calibration_batches: int = 8,
        name: str = "oneshot_pruning",
    ) -> None:
        key = type(self).__name__
        parsed = parse_pattern(pattern, f"{key}.pattern")
        target = resolve_sparsity(sparsity, parsed, f"{key}.sparsity")
        check_choice(method, SCORES, f"{key}.method")
        check_scope(scope, parsed, f"{key}.scope")
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"{key}.calibration_batches: must be an integer >= 1, got {calibration_batches!r}")
        super().__init__(targets, parsed, scope, method, target, name)
        self.method = method
        self.calibration_batches = calibration_batches
        self.pruned = False

    # ------------------------------------------------------------------ pruning
    def prune(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule | None) -> None:
        """Compute the masks once (no-op when already pruned, e.g. restored from a checkpoint)."""
        if self.pruned:
            return
        # Calibration runs the model outside the trainer's forward and the masks are scored from the weights:
        # under FSDP both need the whole parameters.
        with full_parameters(trainer, writeback=True):
            self.reapply_masks()
            if self.measure() > 0.0:  # masks restored with the model (e.g. `validate --ckpt_path`)
                self.pruned = True
                return
            stats = self.calibrate(trainer, pl_module) if self.method == "activation" else None
            self.update_masks(self.target, stats)
        self.pruned = True

    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """Mean squared inputs of every selected layer over ``calibration_batches`` training batches (under FSDP,
        inside :func:`~framework.sharding.full_parameters`: it runs the model outside the trainer's forward).

        Raises:
            ValueError: no datamodule with training batches is attached to the trainer.
        """
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            raise ValueError(f"{self.name}.method: 'activation' calibrates on training batches; run with a "
                             "datamodule that provides train_dataloader()")
        model = pl_module.model
        modes = {module: module.training for module in model.modules()}
        model.eval()
        layers = list(self.layers.values())
        for layer in layers:
            stats = InputNormStats.attach(layer)
            stats.enabled = stats.calibrating = True
        try:
            with trainer.precision_plugin.forward_context():
                for index, batch in enumerate(datamodule.train_dataloader()):
                    if index >= self.calibration_batches:
                        break
                    batch = move_data_to_device(batch, pl_module.device)
                    model(**model_inputs(batch, labels=False), use_cache=False)
            fold_stats(layers, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
            result = {name: getattr(layer, SQ_MEAN_BUFFER).clone() for name, layer in self.layers.items()}
        finally:
            for layer in layers:
                InputNormStats.detach(layer)
            for module, mode in modes.items():
                module.training = mode
        return result

    # ------------------------------------------------------------------ hooks: whichever comes first
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore the checkpoint after setup do it after on_fit_start: wait for on_train_start.
        if not (trainer.strategy.restore_checkpoint_after_setup and trainer.ckpt_path):
            self.prune(trainer, pl_module)
        self._masked_step = trainer.global_step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prune(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.log_metric(pl_module, "target_sparsity", self.target)
        self.log_metric(pl_module, "sparsity", self.sparsity)

    # ------------------------------------------------------------------ state
    @override
    def config_echo(self) -> dict[str, Any]:
        return {**super().config_echo(), "calibration_batches": self.calibration_batches}

    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {**super().summary(model), "pruned": int(self.pruned)}
