"""QuantizationAwareTraining: fake-quant training with LSQ scales, exported as static encodings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.quantization.common import QuantizedModules, freeze_observers
from plugins.quantization.config import ActivationSite, QuantSpec


class QuantizationAwareTraining(QuantizedModules):
    """Train the selected layers through fake quantizers, so the weights and the encodings adapt to the grid.

    Float until ``start_step``. There, static weight quantizers take their scales from the weights (the
    observer's range); static activation quantizers observe ``calibration_batches`` training batches (the model
    runs with quantized weights and float activations meanwhile), then take their scales from the observed
    ranges and switch on. From then on every static scale is learned with LSQ (straight-through rounding, LSQ's
    gradient scale) until ``freeze_observers_at``, after which the encodings are fixed and only the weights
    train. Dynamic quantizers are on from ``start_step``. Scales, zero points and observer ranges are
    parameters and buffers of the model (checkpointed); the callback keeps scalars only.

    Args:
        weights: spec of the weight quantizers (``null``: weights stay float); default 8-bit per channel.
        activations: spec of the activation quantizers at ``activation_points`` of ``targets``.
        targets: which Linear (and Embedding: token tables, types [Linear, Embedding]; Conv2d / Conv3d: patch
            embeddings, per tensor or channel) layers; default the language model's Linear layers, except ``lm_head``.
        activation_points: ``input`` and/or ``output`` of each target.
        activation_sites: more activation quantizers, e.g. the KV cache (outputs of ``k_proj`` / ``v_proj``) or
            the vision projector's output (:class:`~plugins.quantization.config.ActivationSite`).
        start_step: optimizer step where QAT begins (float before), >= 0.
        calibration_batches: training batches observed by static activation quantizers before they switch on,
            >= 1 when there are any (0 otherwise).
        freeze_observers_at: when the encodings stop changing: a fraction of training in (0, 1] or an optimizer
            step (int); ``null``: scales learn until the end.
        scale_lr: learning rate of the scales (``null``: the model's ``lr``); no weight decay on them.
        learn_scales_max_bits: only quantizers at most this wide learn their scales (LSQ); wider ones keep the
            calibrated scale. Adam moves a parameter by about ``lr`` per step whatever its size, and a 16-bit
            activation's scale (range / 65535, ~1e-4) is no larger than that: learned, it swung by its own size
            each step and broke W4A16 QAT, while its rounding error is far below what learning could win back.
        runtime: ``generic`` or ``qnn`` (symmetric static weight encodings and static activations only).
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
        ValueError: a spec outside its range (the message names the key, e.g. ``weights.bits``), negative
            ``start_step``, ``calibration_batches`` < 1 with static activations, a bad ``freeze_observers_at``
            (in ``__init__``, or at fit start when it falls before calibration ends), a group size that does not
            divide a layer's inputs or targets that match nothing (in ``transform``).

    Example::

        trainer:
          callbacks:
            - class_path: plugins.quantization.QuantizationAwareTraining
              init_args:
                weights: {bits: 4, granularity: channel}
                activations: {bits: 8, granularity: tensor, symmetric: false}
                start_step: 100
                calibration_batches: 16
                freeze_observers_at: 0.9
    """

    def __init__(
        self,
        weights: QuantSpec | None = QuantSpec(),  # noqa: B008 (a frozen-by-convention default spec)
        activations: QuantSpec | None = None,
        targets: ModuleSelection | None = None,
        activation_points: list[str] | None = None,
        activation_sites: list[ActivationSite] | None = None,
        start_step: int = 0,
        calibration_batches: int = 8,
        freeze_observers_at: int | float | None = None,
        scale_lr: float | None = None,
        learn_scales_max_bits: int = 8,
        runtime: str = "generic",
        name: str = "qat",
        plan: str | None = None,
        float_reference: str | None = None,
        integer_eval: bool = False,
        shared_inputs: list[list[str]] | None = None,
    ) -> None:
        key = type(self).__name__
        weights = None if weights is None else dataclasses.replace(weights)  # never share the default instance
        super().__init__(weights, activations, targets, activation_points or ["input"], activation_sites, runtime,
                         name, plan, float_reference, integer_eval, shared_inputs)
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"{key}.start_step: must be an integer >= 0, got {start_step!r}")
        static_acts = any(s is not None and s.mode == "static"
                          for s in [activations, *(site.spec for site in self.activation_sites)])
        if not isinstance(calibration_batches, int) or calibration_batches < 0:
            raise ValueError(f"{key}.calibration_batches: must be an integer >= 0, got {calibration_batches!r}")
        if static_acts and calibration_batches < 1:
            raise ValueError(f"{key}.calibration_batches: static activation quantizers need >= 1 calibration batch, "
                             f"got {calibration_batches}")
        if freeze_observers_at is not None:
            if isinstance(freeze_observers_at, bool) or not isinstance(freeze_observers_at, (int, float)):
                raise ValueError(f"{key}.freeze_observers_at: must be a fraction in (0, 1], a step or null")
            if isinstance(freeze_observers_at, float) and not 0.0 < freeze_observers_at <= 1.0:
                raise ValueError(f"{key}.freeze_observers_at: a fraction of training must be in (0, 1], "
                                 f"got {freeze_observers_at}")
            if isinstance(freeze_observers_at, int) and freeze_observers_at < 1:
                raise ValueError(f"{key}.freeze_observers_at: a step must be >= 1, got {freeze_observers_at}")
        if scale_lr is not None and not (scale_lr > 0 and math.isfinite(scale_lr)):
            raise ValueError(f"{key}.scale_lr: must be a positive number or null, got {scale_lr!r}")
        self.start_step = start_step
        self.calibration_batches = calibration_batches if static_acts else 0
        self.freeze_observers_at = freeze_observers_at
        if isinstance(learn_scales_max_bits, bool) or not isinstance(learn_scales_max_bits, int) or \
                not 2 <= learn_scales_max_bits <= 16:
            raise ValueError(f"{key}.learn_scales_max_bits: must be an integer in [2, 16], got {learn_scales_max_bits!r}")
        self.scale_lr = scale_lr
        self.learn_scales_max_bits = learn_scales_max_bits
        self.started = False
        self._freeze_step: int | None = None
        # The phase whose quantizer flags are all set and stay so until the phase changes or an evaluation resets
        # them: steps in it skip the walk over every quantizer (host time a launch-bound GPU step waits for).
        self._settled_phase: str | None = None
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        super().transform(model)
        for quantizer in self.quantizers.values():
            if quantizer.scale is not None and quantizer.spec.bits > self.learn_scales_max_bits:
                quantizer.scale.requires_grad_(False)  # calibrated, then fixed: never reaches the optimizer
        self._model = model

    @override
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": self.scales(), "weight_decay": 0.0}
        if self.scale_lr is not None:
            group["lr"] = self.scale_lr
        return [group] if group["params"] else []

    # ------------------------------------------------------------------ schedule
    @property
    def calibration_end(self) -> int:
        """First step with static activation quantizers on."""
        return self.start_step + self.calibration_batches

    def resolve_freeze_step(self, total_steps: float) -> int | None:
        """The optimizer step from which scales stop learning.

        Raises:
            ValueError: it falls before calibration ends, or a fraction is given for a run of unknown length.
        """
        value = self.freeze_observers_at
        if value is None:
            return None
        if isinstance(value, float):
            if not math.isfinite(total_steps):
                raise ValueError(f"{self.name}.freeze_observers_at: a fraction needs trainer.max_steps; give a step")
            value = round(value * total_steps)
        if value < self.calibration_end:
            raise ValueError(f"{self.name}.freeze_observers_at: resolves to step {value}, before calibration ends at "
                             f"step {self.calibration_end} (start_step {self.start_step} + calibration_batches "
                             f"{self.calibration_batches})")
        return int(value)

    def phase(self, step: int) -> str:
        """``float`` before ``start_step``, ``calibrating`` while activations observe, then ``learning`` /
        ``frozen``."""
        if step < self.start_step:
            return "float"
        if step < self.calibration_end:
            return "calibrating"
        return "frozen" if self._freeze_step is not None and step >= self._freeze_step else "learning"

    def _apply_phase(self, trainer: pl.Trainer, model: nn.Module, *, training: bool) -> None:
        step = trainer.global_step
        phase = self.phase(step)
        if training and phase == self._settled_phase:
            return
        if step < self.start_step:
            for quantizer in self.quantizers.values():
                quantizer.enabled = quantizer.observing = False
            return
        self.started = True
        to_freeze = []
        for name, quantizer in self.quantizers.items():
            quantizer.observing = False
            if name.endswith(".weight") or not quantizer.static or quantizer.is_initialized:
                quantizer.enabled = True
            elif step < self.calibration_end:
                quantizer.enabled, quantizer.observing = False, training
            else:
                to_freeze.append(quantizer)
        # Calibrating weight quantizers reads the weights and fixing scales writes parameters: under FSDP both
        # need the whole tensors, gathered only on the steps that do either.
        if to_freeze or self.uncalibrated_weights(model):
            with full_parameters(trainer, writeback=True):
                self.init_weight_quantizers(model)
                freeze_observers(to_freeze)
        for quantizer in to_freeze:
            quantizer.enabled = True
        # Learning and frozen steps set the same flags every time once calibration is over.
        self._settled_phase = phase if training and phase in ("learning", "frozen") else None

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze_step = self.resolve_freeze_step(trainer.estimated_stepping_batches)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply_phase(trainer, pl_module.model, training=True)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.phase(trainer.global_step) == "frozen":
            for scale in self.scales():
                scale.grad = None  # optimizers skip parameters without a gradient: the encodings stay fixed

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._settled_phase is None:  # observers only ever run while unsettled (calibration)
            for quantizer in self.quantizers.values():
                quantizer.observing = False
        phase = self.phase(trainer.global_step - 1) if trainer.global_step else "float"
        self.log_metric(pl_module, "active", float(phase in ("learning", "frozen")))
        self.log_metric(pl_module, "calibrating", float(phase == "calibrating"))
        self.log_metric(pl_module, "frozen", float(phase == "frozen"))
        self.log_metric(pl_module, "weight_bits", self.weight_bits if phase != "float" else 32.0)

    def _eval_phase(self) -> None:
        self._settled_phase = None  # training flags are set again at the next training step
        started = self.started or any(q.is_initialized for q in self.quantizers.values() if q.static)
        for quantizer in self.quantizers.values():
            quantizer.observing = False
            quantizer.enabled = started and (quantizer.is_initialized or not quantizer.static)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_phase()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_phase()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_phase()

    # ------------------------------------------------------------------ state
    @override
    def config_echo(self) -> dict[str, Any]:
        return {**super().config_echo(), "start_step": self.start_step,
                "calibration_batches": self.calibration_batches, "freeze_observers_at": self.freeze_observers_at}

    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"started": self.started}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.started = bool(state.get("started", False))

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {**super().summary(model), "started": int(self.started), "start_step": self.start_step}

