"""Lightning glue for glyph supervision."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from framework.plugin import CompressionPlugin
from framework.processing import GLYPH_CLASSES, GLYPH_SLOTS, IGNORE_INDEX

HEAD = "glyph_head"


def vision_tower_of(model: nn.Module) -> nn.Module:
    """The model's vision tower (LLaVA-style models: a submodule named ``vision_tower``)."""
    towers = [module for name, module in model.named_modules() if name.split(".")[-1] == "vision_tower"]
    if len(towers) != 1:
        raise ValueError(f"glyph supervision needs one module named 'vision_tower', {type(model).__name__} has "
                         f"{len(towers)}")
    return towers[0]


class _FeatureCapture:
    """The vision tower's forward hook. A deep copy of the model (``vlmc bench``'s bf16 decode copy, a teacher)
    gets an inert one: the copy must not feed the plugin, nor drag it and its captured activations along."""

    def __init__(self, plugin: GlyphSupervision | None) -> None:
        self.plugin = plugin

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.plugin is not None:
            self.plugin._capture(module, args, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _FeatureCapture:
        return _FeatureCapture(None)


class GlyphSupervision(CompressionPlugin):
    """Add ``weight * CE(head(patch features), glyph_targets)`` to every training step.

    The head (``glyph_head``, one linear layer from the vision tower's width to ``GLYPH_SLOTS`` x (1 +
    ``len(GLYPH_CLASSES)``) logits per patch) is a submodule of the model, so it trains with it and is saved and
    restored with it; it reads the vision layer the projector reads (``vision_feature_layer``). Validation logs
    ``compression/<name>/char_accuracy``: the share of printed characters (non-empty target slots) the head reads
    right, and ``digit_accuracy``, the same over digits (what the cards' random ids and numbers need). Export removes the head; checkpoints keep it, so resume or validate them with the plugin in the config
    (or export first: the export is the plain HF model).

    Args:
        weight: factor of the reading loss (> 0); the task loss keeps weight 1.
        name: log namespace and checkpoint key.

    Raises:
        ValueError: ``weight`` not > 0; at start-up, a model without one ``vision_tower`` or without a fixed patch
            grid; during training, batches with images but no ``glyph_targets``.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.glyph_supervision.GlyphSupervision
              init_args: {weight: 0.5}
    """

    exclusive_claims = False
    config_name = "glyph supervision"

    def __init__(self, weight: float = 0.5, name: str = "glyphs") -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{name}.weight: must be a number > 0, got {weight!r}")
        self.weight, self.name = float(weight), name
        self._features: torch.Tensor | None = None
        self._hook: Any = None
        self._layer = -1
        self._patches = 0
        self._read: torch.Tensor | None = None  # this validation's counts (see on_validation_epoch_start)

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        tower = vision_tower_of(model)
        config = model.config
        vision = config.vision_config
        if not (hasattr(vision, "image_size") and hasattr(vision, "patch_size")):
            raise ValueError(f"{self.name}: {config.model_type} has no fixed patch grid (vision_config.image_size and "
                             "patch_size); glyph supervision needs one")
        self._patches = (vision.image_size // vision.patch_size) ** 2
        layer = getattr(config, "vision_feature_layer", -1)
        self._layer = layer if isinstance(layer, int) else layer[-1]
        if not isinstance(getattr(model, HEAD, None), nn.Linear):
            head = nn.Linear(vision.hidden_size, GLYPH_SLOTS * (1 + len(GLYPH_CLASSES)))
            model.add_module(HEAD, head.to(next(model.parameters()).device))
        if self._hook is not None:
            self._hook.remove()
        self._hook = tower.register_forward_hook(_FeatureCapture(self))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the dataloaders exist: the processor builds the targets only when a plugin asks for them.
        processor = getattr(pl_module, "processor", None)
        if processor is not None:
            processor.glyph_targets = True

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        # The first vision forward of a step (validation then also generates, with the same images).
        if self._features is None:
            hidden = getattr(output, "hidden_states", None)
            self._features = hidden[self._layer] if hidden is not None else output.last_hidden_state

    def _logits(self, model: nn.Module) -> torch.Tensor:
        features = self._features[:, -self._patches :]  # the patches, without a leading class token
        logits = getattr(model, HEAD)(features.to(getattr(model, HEAD).weight.dtype))
        return logits.view(*features.shape[:2], GLYPH_SLOTS, 1 + len(GLYPH_CLASSES))

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if "pixel_values" not in batch:
            return None  # a text-only batch
        targets = batch.get("glyph_targets")
        if targets is None:
            raise ValueError(f"{self.name}: the batch has images but no 'glyph_targets' (the processor builds them, when "
                             "asked, for families with a fixed patch grid, in batches with answers)")
        return targets

    # ------------------------------------------------------------------ training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._features = None

    @override
    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        targets = self._targets(batch)
        if targets is None or self._features is None:
            return {}
        logits = self._logits(model)
        self._features = None
        loss = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return {"reading": self.weight * loss}

    # ------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # characters read right, characters printed, digits read right, digits printed
        self._read = torch.zeros(4, dtype=torch.long, device=pl_module.device)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._features = None

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        targets = self._targets(batch) if isinstance(batch, dict) else None
        if targets is None or self._features is None:
            return
        with torch.no_grad():
            predicted = self._logits(pl_module.model).argmax(-1)
        self._features = None
        if self._read is None:
            self.on_validation_epoch_start(trainer, pl_module)
        # Counted on the device with masks (no boolean indexing) and read once per validation: no sync per batch.
        right = predicted == targets
        printed = targets > 0
        digits = printed & (targets <= 10)  # class ids 1-10 are "0"-"9"
        self._read += torch.stack([(right & printed).sum(), printed.sum(), (right & digits).sum(), digits.sum()])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._read is None:
            return
        correct, printed, digits_correct, digits = trainer.strategy.reduce(self._read.float(), reduce_op="sum").tolist()
        for metric, right, total in (("char_accuracy", correct, printed), ("digit_accuracy", digits_correct, digits)):
            if total > 0:
                self.log_metric(pl_module, metric, right / total, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ state and export
    @override
    def config_echo(self) -> dict[str, Any]:
        return {"classes": GLYPH_CLASSES, "slots": GLYPH_SLOTS}

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        head = getattr(model, HEAD, None)
        return {"head_parameters": sum(p.numel() for p in head.parameters()) if head is not None else 0}

    @override
    def prepare_export(self, model: nn.Module) -> None:
        if hasattr(model, HEAD):
            delattr(model, HEAD)
