"""Pure-torch part: a per-output-channel 0/1 mask stored as a buffer and applied by a forward hook."""

from __future__ import annotations

import torch
import torch.nn as nn

MASK_BUFFER = "channel_mask"
_HOOK_ATTR = "_channel_mask_hook"


def channel_mask_of(layer: nn.Linear) -> torch.Tensor | None:
    return getattr(layer, MASK_BUFFER, None)


def add_channel_mask(layer: nn.Linear, mask: torch.Tensor, is_active: callable) -> None:
    """Register ``mask`` (shape ``[out_features]``) on ``layer`` and a hook applying it while ``is_active()``.

    Idempotent: an existing mask buffer (e.g. one restored from a checkpoint) is kept.
    """
    if mask.shape != (layer.out_features,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({layer.out_features},)")
    if channel_mask_of(layer) is None:
        layer.register_buffer(MASK_BUFFER, mask.to(layer.weight.device, layer.weight.dtype), persistent=True)
    if getattr(layer, _HOOK_ATTR, None) is None:

        def apply(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if not is_active():
                return output
            return output * getattr(module, MASK_BUFFER).to(output.dtype)

        setattr(layer, _HOOK_ATTR, layer.register_forward_hook(apply))


def bake_channel_mask(layer: nn.Linear) -> None:
    """Zero the masked rows of the weight (and bias) and remove the buffer and hook."""
    mask = channel_mask_of(layer)
    if mask is None:
        return
    with torch.no_grad():
        layer.weight.mul_(mask.to(layer.weight.dtype)[:, None])
        if layer.bias is not None:
            layer.bias.mul_(mask.to(layer.bias.dtype))
    hook = getattr(layer, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        setattr(layer, _HOOK_ATTR, None)
    delattr(layer, MASK_BUFFER)
