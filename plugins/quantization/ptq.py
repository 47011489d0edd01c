"""PostTrainingQuantization: the PTQ baseline, calibrated once and fixed (round to nearest, no training).

Weight quantizers take their qparams from the weights; static activation quantizers observe a few training batches
run with the weights already quantized (:func:`observe_activations`, pure torch), then every encoding is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from typing_extensions import override

from framework.module import model_inputs
from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.quantization.common import QuantizedModules, freeze_observers
from plugins.quantization.config import ActivationSite, QuantSpec
from plugins.quantization.placement import distinct
from plugins.quantization.quantizer import FakeQuantizer


@torch.no_grad()
def observe_activations(model: nn.Module, quantizers: Mapping[str, FakeQuantizer], pending: Sequence[FakeQuantizer],
                        batches: Iterable[Mapping[str, Any]], device: torch.device | None = None,
                        context: contextlib.AbstractContextManager | None = None) -> None:
    """PTQ's calibration of static activation ranges: fix the encodings of ``pending`` from ``batches``.

    ``model`` runs in eval mode on each batch's model inputs (no labels, no KV cache), with the quantizers in
    ``quantizers`` that already quantize switched on (weights, dynamic activations, calibrated activations) and
    ``pending`` observing; then their observers freeze (ranges combined across data-parallel ranks). Train/eval modes
    are restored; the quantizers' flags are left for the caller to set.

    Args:
        model: the HF model the quantizers are attached to.
        quantizers: a plugin's quantizers by tensor name.
        pending: the static activation quantizers to calibrate (each observes from scratch when it has observed
            nothing yet, e.g. after :meth:`~plugins.quantization.quantizer.FakeQuantizer.reset`).
        batches: collated batches (moved to ``device``).
        device: default: the model's.
        context: entered around the forward passes (a trainer's precision, e.g. bf16 autocast); default none.
    """
    device = device or next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for quantizer in quantizers.values():  # weights on, activations observe
        quantizer.enabled = quantizer.observing = False
        if quantizer in pending:
            quantizer.observing = True
        elif quantizer.is_initialized or not quantizer.static:
            quantizer.enabled = True
    try:
        with context or contextlib.nullcontext():
            for batch in batches:
                model(**model_inputs(move_data_to_device(batch, device), labels=False), use_cache=False)
        freeze_observers(list(pending))
    finally:
        for module, mode in modes.items():
            module.training = mode


class PostTrainingQuantization(QuantizedModules):
    """Quantize the selected layers after training: observe ranges on a few batches, fix the encodings.

    Same placement, specs and export as :class:`~plugins.quantization.QuantizationAwareTraining`. At whichever of
    fit, validation, test or predict starts first (after any checkpoint restore), weight quantizers take their
    qparams from the weights (the observer on the weight) and static activation quantizers from
    ``calibration_batches`` training batches (``trainer.datamodule.train_dataloader()``, eval mode, no
    gradients, weights already quantized); then every quantizer is on and every scale is fixed. Meant for
    ``vlmc validate`` / ``test``; under ``fit`` the weights train against the fixed grid.

    Args:
        weights: spec of the weight quantizers (``null``: float weights); default 8-bit per channel.
        activations: spec of the activation quantizers at ``activation_points`` of ``targets``.
        targets: which Linear (and Embedding: token tables, types [Linear, Embedding]) layers; default the language
            model's Linear layers, except ``lm_head``.
        activation_points: ``input`` and/or ``output`` of each target.
        activation_sites: more activation quantizers (KV cache, projector output).
        calibration_batches: training batches observed for static activation ranges, >= 1.
        runtime: ``generic`` or ``qnn``.
        name: log namespace, checkpoint key and export file prefix.
        plan: a mixed-precision plan JSON (:mod:`plugins.quantization.sensitivity`): its per-layer weight bits
            override ``weights.bits``; it must name exactly the layers ``targets`` selects (``null``: uniform).
        float_reference: the float model that top-1 agreement is measured against (HF folder, hub id or spec
            JSON); ``null``: this model with its quantizers switched off. Give the float model QAT started from:
            QAT's own weights move with training, so switching its quantizers off is no longer "the float model".
        integer_eval: validate and test with integer arithmetic in every quantized Linear (input codes times
            weight codes, exact accumulation, then scales), what the exported model computes on a device and in
            :class:`~plugins.quantization.runtime.IntegerRuntime`, bit for bit; training keeps the float path.
        shared_inputs: groups of sibling modules that read one tensor, e.g. ``[[q_proj, k_proj, v_proj],
            [gate_proj, up_proj]]`` for Llama/Qwen layers: each group's inputs share one quantizer, so the tensor
            has one encoding, as a device quantizes it once (the export lists the sharing under
            ``vlmc.shared_activations``). ``null``: every input has its own quantizer.

    Raises:
        ValueError: a spec outside its range (naming the key), ``calibration_batches`` < 1, targets that
            match nothing; static activations without a datamodule to calibrate on (at calibration).

    Example::

        trainer:
          callbacks:
            - class_path: plugins.quantization.PostTrainingQuantization
              init_args:
                weights: {bits: 4, granularity: channel, observer: mse}
                activations: {bits: 8, granularity: tensor, symmetric: false}
                calibration_batches: 16
    """

    export_needs_data = True  # `vlmc export` validates first, which calibrates

    def __init__(
        self,
        weights: QuantSpec | None = QuantSpec(),  # noqa: B008
        activations: QuantSpec | None = None,
        targets: ModuleSelection | None = None,
        activation_points: list[str] | None = None,
        activation_sites: list[ActivationSite] | None = None,
        calibration_batches: int = 8,
        runtime: str = "generic",
        name: str = "ptq",
        plan: str | None = None,
        float_reference: str | None = None,
        integer_eval: bool = False,
        shared_inputs: list[list[str]] | None = None,
    ) -> None:
        key = type(self).__name__
        weights = None if weights is None else dataclasses.replace(weights)
        super().__init__(weights, activations, targets, activation_points or ["input"], activation_sites, runtime,
                         name, plan, float_reference, integer_eval, shared_inputs)
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"{key}.calibration_batches: must be an integer >= 1, got {calibration_batches!r}")
        self.calibration_batches = calibration_batches
        self.calibrated = False

    @override
    def transform(self, model: nn.Module) -> None:
        super().transform(model)
        for quantizer in self.quantizers.values():
            if quantizer.scale is not None:
                quantizer.scale.requires_grad_(False)  # fixed encodings: never reach the optimizer

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Weights from themselves, static activations from training batches; then everything on. Once.

        Raises:
            ValueError: static activation quantizers but no datamodule with ``train_dataloader()``.
        """
        model = pl_module.model
        if not self.calibrated:
            # Weights are read, scales written and the model run outside the trainer's forward: under FSDP all
            # of it needs the whole parameters.
            with full_parameters(trainer, writeback=True):
                self.init_weight_quantizers(model)
                pending = [q for q in self.static_quantizers("activation").values() if not q.is_initialized]
                if pending:
                    self._observe(trainer, pl_module, pending)
            self.calibrated = True
        for quantizer in self.quantizers.values():
            quantizer.enabled, quantizer.observing = True, False

    def _observe(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, pending: list) -> None:
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            raise ValueError(f"{self.name}.calibration_batches: static activations calibrate on training batches; "
                             "run with a datamodule that provides train_dataloader()")
        observe_activations(pl_module.model, self.quantizers, pending,
                            itertools.islice(datamodule.train_dataloader(), self.calibration_batches),
                            pl_module.device, trainer.precision_plugin.forward_context())

    @torch.no_grad()
    def recalibrate(self, model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> None:
        """Calibrate every static quantizer again, from scratch, for the weights ``model`` holds now, as
        :meth:`calibrate` does at the start of a run: weights from themselves, activations observed on ``batches``
        (what PTQ observes: the first ``calibration_batches`` training batches); then everything on.

        Pure torch, one process, in the caller's precision context: a plan check writes each plan's quantized weights
        into a model that carries only this plugin's activation quantizers, and calibrates them for it here.
        """
        for quantizer in distinct(q for q in self.quantizers.values() if q.static):
            quantizer.reset()
        self.init_weight_quantizers(model)
        pending = list(self.static_quantizers("activation").values())
        if pending:
            observe_activations(model, self.quantizers, pending, batches)
        self.calibrated = True
        for quantizer in self.quantizers.values():
            quantizer.enabled, quantizer.observing = True, False

    # ------------------------------------------------------------------ hooks: whichever comes first
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (trainer.strategy.restore_checkpoint_after_setup and trainer.ckpt_path):
            self.calibrate(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calibrate(trainer, pl_module)

    # ------------------------------------------------------------------ state
    @override
    def config_echo(self) -> dict[str, Any]:
        return {**super().config_echo(), "calibration_batches": self.calibration_batches}

    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.calibrated = bool(state.get("calibrated", False))

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {**super().summary(model), "calibration_batches": self.calibration_batches}
