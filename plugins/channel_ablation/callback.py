"""Lightning glue for channel ablation."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from safetensors.torch import save_file
from typing_extensions import override

from framework.plugin import CompressionPlugin
from framework.selection import ModuleSelection
from plugins.channel_ablation.layer import add_channel_mask, bake_channel_mask, channel_mask_of


class ChannelAblation(CompressionPlugin):
    """Zero ``fraction`` of the output channels of each selected linear layer from ``start_step`` on.

    Args:
        targets: which layers (the framework's one selection rule); default: every Linear of the language model
            except the LM head.
        fraction: share of output channels zeroed in each layer, in [0, 1).
        seed: chooses the channels; the same seed gives the same masks on every rank and after a resume.
        start_step: optimizer step from which the masks apply (0: from the start).
        name: log namespace and checkpoint key; set it when two instances run together.

    Raises:
        ValueError: ``fraction`` outside [0, 1), negative ``start_step``, or targets that match no module.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.channel_ablation.ChannelAblation
              init_args: {fraction: 0.25, targets: {include: language_model, exclude: lm_head}}
    """

    def __init__(
        self,
        targets: ModuleSelection | None = None,
        fraction: float = 0.25,
        seed: int = 0,
        start_step: int = 0,
        name: str = "channel_ablation",
    ) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"ChannelAblation.fraction: must be in [0, 1), got {fraction}")
        if start_step < 0:
            raise ValueError(f"ChannelAblation.start_step: must be >= 0, got {start_step}")
        self.targets = targets or ModuleSelection(include="language_model", exclude="lm_head")
        self.fraction = fraction
        self.seed = seed
        self.start_step = start_step
        self.name = name
        self.active = start_step == 0
        self.layers: dict[str, nn.Linear] = {}

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        self.layers = self.targets.select(model, owner=f"{self.name}.targets")
        for qualified, layer in self.layers.items():
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"{self.name}.targets: {qualified} is a {type(layer).__name__}, expected Linear")
            add_channel_mask(layer, self._mask(qualified, layer.out_features), lambda: self.active)

    def _mask(self, qualified: str, width: int) -> torch.Tensor:
        # Seeded by (seed, layer name), not by a global RNG: identical on every rank and independent of order.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(qualified.encode()))
        zeroed = torch.randperm(width, generator=generator, device="cpu")[: int(round(self.fraction * width))]
        mask = torch.ones(width)
        mask[zeroed] = 0.0
        return mask

    @override
    def claims(self, model: nn.Module) -> set[str]:
        return {f"{name}.weight" for name in self.layers}

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.active = trainer.global_step >= self.start_step
        self.log_metric(pl_module, "active", float(self.active))
        self.log_metric(pl_module, "zeroed_fraction", self.zeroed_fraction() if self.active else 0.0)

    def zeroed_fraction(self) -> torch.Tensor:
        """Share of the selected output channels zeroed (a 0-dim tensor: logging it needs no host-device sync)."""
        masks = [m for m in (channel_mask_of(layer) for layer in self.layers.values()) if m is not None]
        total = sum(m.numel() for m in masks)
        if not masks:
            return torch.zeros(())
        return sum((m == 0).sum() for m in masks) / max(1, total)

    # ------------------------------------------------------------------ state
    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"active": self.active, "fraction": self.fraction, "seed": self.seed}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("fraction", self.fraction) != self.fraction:
            raise ValueError(
                f"{self.name}: the checkpoint was made with seed={state.get('seed')} fraction={state.get('fraction')}, "
                f"the config says seed={self.seed} fraction={self.fraction}; a resumed run must use the same masks"
            )
        self.active = bool(state.get("active", self.active))

    # ------------------------------------------------------------------ results and export
    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {"zeroed_fraction": float(self.zeroed_fraction()), "layers": len(self.layers), "active": int(self.active)}

    @override
    def prepare_export(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.Linear) and channel_mask_of(module) is not None:
                if self.active:
                    bake_channel_mask(module)
                else:  # not yet switched on: deploy the dense layer
                    module._buffers.pop("channel_mask")

    @override
    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        masks = {f"{name}.{'channel_mask'}": channel_mask_of(layer).detach().cpu().contiguous()
                 for name, layer in self.layers.items() if channel_mask_of(layer) is not None}
        save_file(masks, str(directory / f"{self.name}.safetensors"))
        meta = {"fraction": self.fraction, "seed": self.seed, "active": self.active, "layers": sorted(self.layers)}
        (directory / f"{self.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [f"{self.name}.safetensors", f"{self.name}.json"]
