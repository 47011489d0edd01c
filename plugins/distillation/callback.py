"""Lightning glue for knowledge distillation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.losses import answer_distillation_kl
from framework.module import training_inputs
from framework.plugin import CompressionPlugin


class Distillation(CompressionPlugin):
    """Add ``weight * KL(teacher || student)`` on the answer tokens to every training step.

    Args:
        teacher: the teacher model: an exported HF folder, a hub id or a tiny spec JSON (``framework.models``);
            typically the dense model the compressed student started from. Loaded when training starts (export
            and validation do not need it), frozen, in eval mode, on the student's device; it must be the student's
            model class with the same vocabulary.
        weight: factor of the KL term (> 0); the task loss on the labels keeps weight 1.
        temperature: softens both distributions (> 0); the term is multiplied by ``temperature**2`` so its
            gradient keeps the task loss's scale.
        name: log namespace and checkpoint key.

    Raises:
        ValueError: ``weight`` or ``temperature`` not > 0, an empty ``teacher``; when training starts, a teacher
            that does not load (naming ``teacher``), of another model class or vocabulary size.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.sparsity.SparsityRamp
              init_args: {final_sparsity: 0.75, start: 0.0, end: 0.7}
            - class_path: plugins.distillation.Distillation
              init_args: {teacher: runs/exports/dense_base, weight: 1.0, temperature: 2.0}
    """

    config_name = "distillation"

    def __init__(self, teacher: str, weight: float = 1.0, temperature: float = 1.0,
                 name: str = "distillation") -> None:
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"{name}.teacher: must be a model folder, hub id or spec JSON, got {teacher!r}")
        if not weight > 0:
            raise ValueError(f"{name}.weight: must be > 0, got {weight}")
        if not temperature > 0:
            raise ValueError(f"{name}.temperature: must be > 0, got {temperature}")
        self.teacher_source, self.weight, self.temperature, self.name = teacher, float(weight), float(temperature), name
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
            if type(model).__name__ != type(like).__name__:
                raise ValueError(f"{self.name}.teacher: {self.teacher_source} is a {type(model).__name__}, the "
                                 f"student a {type(like).__name__}; both must read the same batches")
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
        self.teacher(pl_module.model)

    @override
    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        teacher = self.teacher(model)
        with torch.no_grad():
            # The student's own inputs (the training step's): the same positions, the same attention path.
            teacher_logits = teacher(**{k: v for k, v in training_inputs(batch).items() if k != "labels"}).logits
        kl = answer_distillation_kl(outputs.logits, teacher_logits, batch, self.temperature)
        module = self._pl_module
        if module is not None and module._trainer is not None and module.training:
            self.log_metric(module, "kl", kl)
        return {"kl": self.weight * kl}

    # ------------------------------------------------------------------ state and results
    @override
    def config_echo(self) -> dict[str, Any]:
        return {"teacher": self.teacher_source, "weight": self.weight, "temperature": self.temperature}

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return self.config_echo()
