"""Lightning glue for knowledge distillation."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.losses import answer_distillation_kl, answer_feature_error, check_feature_layers, feature_layers_arg
from framework.module import training_inputs
from framework.plugin import CompressionPlugin
from framework.sharding import unsharded_class


class Distillation(CompressionPlugin):
    """Add ``weight * KL(teacher || student)`` on the answer tokens to every training step, and optionally
    ``feature_weight`` times the students' hidden states' relative squared error to the teacher's.

    The feature term (layer-wise distillation, as CoFi pairs with structured pruning) compares the text model's
    hidden states at ``feature_layers`` (indices into the model's ``hidden_states``: 0 the embeddings, ``-1`` the
    last layer after its final norm) on the positions the KL uses: ``sum ||h_s - h_t||^2 / sum ||h_t||^2`` per
    layer, averaged over the layers. It gives the student a target inside the network, not only at its output.

    Args:
        teacher: the teacher model: an exported HF folder, a hub id or a tiny spec JSON (``framework.models``);
            typically the dense model the compressed student started from. Loaded when training starts (export
            and validation do not need it), frozen, in eval mode, on the student's device; it must be the student's
            model class with the same vocabulary.
        weight: factor of the KL term (> 0); the task loss on the labels keeps weight 1.
        temperature: softens both distributions (> 0); the term is multiplied by ``temperature**2`` so its
            gradient keeps the task loss's scale.
        feature_weight: factor of the hidden-state term (>= 0; 0 turns it off, and the model is not asked for
            its hidden states).
        feature_layers: which hidden states the feature term compares (default ``[-1]``, the last layer's).
        name: log namespace and checkpoint key.

    Raises:
        ValueError: ``weight`` or ``temperature`` not > 0, ``feature_weight`` negative, ``feature_layers`` empty,
            repeated or not integers, an empty ``teacher``; when training starts, a teacher that does not load
            (naming ``teacher``), of another model class or vocabulary size, and with ``feature_weight`` a student
            or teacher without one of ``feature_layers`` or of another hidden size (e.g. an already pruned export).

    Example::

        trainer:
          callbacks:
            - class_path: plugins.sparsity.SparsityRamp
              init_args: {final_sparsity: 0.75, start: 0.0, end: 0.7}
            - class_path: plugins.distillation.Distillation
              init_args: {teacher: runs/exports/dense_base, weight: 1.0, temperature: 2.0,
                          feature_weight: 1.0, feature_layers: [4, 8, -1]}
    """

    config_name = "distillation"

    def __init__(self, teacher: str, weight: float = 1.0, temperature: float = 1.0, feature_weight: float = 0.0,
                 feature_layers: list[int] | None = None, name: str = "distillation") -> None:
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"{name}.teacher: must be a model folder, hub id or spec JSON, got {teacher!r}")
        if not weight > 0:
            raise ValueError(f"{name}.weight: must be > 0, got {weight}")
        if not temperature > 0:
            raise ValueError(f"{name}.temperature: must be > 0, got {temperature}")
        if not (feature_weight >= 0 and math.isfinite(feature_weight)):
            raise ValueError(f"{name}.feature_weight: must be >= 0 (0: off), got {feature_weight}")
        layers = feature_layers_arg(feature_layers, f"{name}.feature_layers")
        self.teacher_source, self.weight, self.temperature, self.name = teacher, float(weight), float(temperature), name
        self.feature_weight, self.feature_layers = float(feature_weight), layers
        self.needs_hidden_states = self.feature_weight > 0
        self._teacher: nn.Module | None = None
        self._pl_module: pl.LightningModule | None = None

    # ------------------------------------------------------------------ the teacher
    def teacher(self, like: nn.Module) -> nn.Module:
        """The frozen teacher, loaded once and kept on ``like``'s device (not a submodule: never trained,
        checkpointed or exported with the student)."""
        if self._teacher is None:
            from framework.models import load_vlm

            try:
                model = load_vlm(self.teacher_source).model
            except (FileNotFoundError, ValueError, OSError) as err:
                raise type(err)(f"{self.name}.teacher: {err}") from err
            if unsharded_class(model).__name__ != unsharded_class(like).__name__:
                raise ValueError(f"{self.name}.teacher: {self.teacher_source} is a {type(model).__name__}, the "
                                 f"student a {unsharded_class(like).__name__}; both must read the same batches")
            vocab = (model.get_output_embeddings().out_features, like.get_output_embeddings().out_features)
            if vocab[0] != vocab[1]:
                raise ValueError(f"{self.name}.teacher: vocabulary of {vocab[0]} tokens, the student's {vocab[1]}")
            self._teacher = model.eval().requires_grad_(False)
        device = next(like.parameters()).device
        if next(self._teacher.parameters()).device != device:
            self._teacher.to(device)
        return self._teacher

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_teacher": None, "_pl_module": None}  # copies reload it rather than clone it

    # ------------------------------------------------------------------ training objective
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Loaded when training starts, so a wrong teacher fails before the first step; exporting or validating
        # the student never needs it.
        self._pl_module = pl_module
        teacher = self.teacher(pl_module.model)
        if self.feature_weight > 0:
            self.check_features(pl_module.model, teacher)

    def check_features(self, student: nn.Module, teacher: nn.Module) -> None:
        """Both models have every ``feature_layers`` index and one hidden size.

        Raises:
            ValueError: naming ``feature_layers`` or ``feature_weight`` and what differs.
        """
        shapes = {role: check_feature_layers(model, self.feature_layers, f"{self.name}.feature_layers", role)
                  for role, model in (("student", student), ("teacher", teacher))}
        if shapes["student"] != shapes["teacher"]:
            raise ValueError(f"{self.name}.feature_weight: the student's hidden size is {shapes['student']}, the "
                             f"teacher's {shapes['teacher']}; hidden states compare only at one width (distil "
                             "features before exporting a pruned model, or set feature_weight: 0)")

    @override
    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        teacher = self.teacher(model)
        features = self.feature_weight > 0
        with torch.no_grad():
            # The student's own inputs (the training step's): the same positions, the same attention path.
            inputs = {k: v for k, v in training_inputs(batch).items() if k != "labels"}
            teacher_out = teacher(**inputs, output_hidden_states=features)
        kl = answer_distillation_kl(outputs.logits, teacher_out.logits, batch, self.temperature)
        self._log("kl", kl)
        terms = {"kl": self.weight * kl}
        if features:
            error = answer_feature_error(outputs, teacher_out, batch, self.feature_layers, self.name)
            self._log("feature_error", error)
            terms["features"] = self.feature_weight * error
        return terms

    def _log(self, metric: str, value: torch.Tensor) -> None:
        module = self._pl_module
        if module is not None and module._trainer is not None and module.training:
            self.log_metric(module, metric, value)

    # ------------------------------------------------------------------ state and results
    @override
    def config_echo(self) -> dict[str, Any]:
        echo = {"teacher": self.teacher_source, "weight": self.weight, "temperature": self.temperature}
        if self.feature_weight > 0:  # checkpoints from before the feature term resume as they were
            echo.update(feature_weight=self.feature_weight, feature_layers=self.feature_layers)
        return echo

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return self.config_echo()
