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


def feature_layers_arg(layers: Any, key: str) -> list[int]:
    """A ``feature_layers`` argument checked and defaulted: distinct hidden-state indices, ``[-1]`` when ``None``.

    Raises:
        ValueError: naming ``key``: an empty list, a repeated index or one that is not an integer.
    """
    chosen = [-1] if layers is None else list(layers)
    if not chosen or any(isinstance(i, bool) or not isinstance(i, int) for i in chosen) \
            or len(set(chosen)) != len(chosen):
        raise ValueError(f"{key}: must be distinct hidden-state indices (0 the embeddings, -1 the last layer), "
                         f"got {layers!r}")
    return chosen


def check_feature_layers(model: Any, layers: list[int], key: str, role: str = "model") -> int:
    """That ``model``'s text model has a hidden state at every index of ``layers``; returns its hidden size.

    Raises:
        ValueError: naming ``key`` and the indices the model does not have.
    """
    text = model.config.get_text_config()
    states = int(text.num_hidden_layers) + 1  # the embeddings, then each layer's output
    outside = [i for i in layers if not -states <= i < states]
    if outside:
        raise ValueError(f"{key}: {outside} outside the {role}'s {states} hidden states (indices {-states}..{states - 1})")
    return int(text.hidden_size)


def answer_feature_error(student: Any, teacher: Any, batch: dict[str, Any], layers: list[int],
                         key: str) -> torch.Tensor:
    """Mean over ``layers`` of :func:`relative_feature_error` between two model outputs' hidden states, on the
    positions :func:`answer_positions` picks.

    Raises:
        RuntimeError: naming ``key`` when the student's outputs hold no hidden states.
    """
    states = getattr(student, "hidden_states", None)
    if states is None:
        raise RuntimeError(f"{key}: the training step's outputs hold no hidden_states; the module must ask the model "
                           "for them (needs_hidden_states)")
    span, mask = answer_positions(batch, student.logits.shape[1])
    return torch.stack([relative_feature_error(states[i][:, span], teacher.hidden_states[i][:, span], mask)
                        for i in layers]).mean()


def answer_distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, Any],
                           temperature: float = 1.0) -> torch.Tensor:
    """:func:`distillation_kl` on the positions that predict answer tokens (logits at ``t`` predict token
    ``t + 1``), or on every unpadded position of a batch without labels."""
    labels = batch.get("labels")
    if labels is not None and labels.shape == student_logits.shape[:-1]:
        mask = labels[:, 1:] != IGNORE_INDEX
        return distillation_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask, temperature)
    return distillation_kl(student_logits, teacher_logits, batch.get("attention_mask"), temperature)
