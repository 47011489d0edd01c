"""Training losses shared by plugins (technique-agnostic)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from framework.processing import IGNORE_INDEX


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of ``KL(teacher || student)`` on temperature-softened distributions, times
    ``temperature**2`` (Hinton et al. 2015), so its gradient keeps the scale of the task loss."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0) * t * t
    return per_position.mean() * t * t


def answer_positions(batch: dict[str, Any], length: int) -> tuple[slice, torch.Tensor | None]:
    """Which positions of a ``length``-long sequence predict answer tokens: the slice to take (states at ``t``
    predict token ``t + 1``) and its mask; every unpadded position (the attention mask) for a batch without
    labels."""
    labels = batch.get("labels")
    if labels is not None and labels.shape[-1] == length:
        return slice(0, length - 1), labels[:, 1:] != IGNORE_INDEX
    return slice(0, length), batch.get("attention_mask")


def relative_feature_error(student: torch.Tensor, teacher: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum ||s - t||^2 / sum ||t||^2`` over the masked positions of two ``[batch, positions, width]`` state
    tensors: a squared error relative to the teacher's own energy, so one weight suits models of any width and
    activation scale (0 when the student reproduces the teacher)."""
    student, teacher = student.float(), teacher.float()
    error, energy = (student - teacher).pow(2).sum(-1), teacher.pow(2).sum(-1)
    if mask is not None:
        mask = mask.to(error.dtype)
        error, energy = error * mask, energy * mask
    return error.sum() / energy.sum().clamp(min=1e-12)


def answer_distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, Any],
                           temperature: float = 1.0) -> torch.Tensor:
    """:func:`distillation_kl` on the positions that predict answer tokens (logits at ``t`` predict token
    ``t + 1``), or on every unpadded position of a batch without labels."""
    labels = batch.get("labels")
    if labels is not None and labels.shape == student_logits.shape[:-1]:
        mask = labels[:, 1:] != IGNORE_INDEX
        return distillation_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask, temperature)
    return distillation_kl(student_logits, teacher_logits, batch.get("attention_mask"), temperature)
