"""Turning samples into model inputs, for each supported VLM family.

The HF image processor of each family prepares pixels; the family knows how many placeholder tokens an image
takes and which extra inputs its forward needs. Text is laid out without a chat template, which tiny models
trained here do not have::

    <bos>[image placeholder]<prompt>\\n<answer><eos>

Labels are ``-100`` on the prompt and padding, so the loss covers answer tokens only.

On request (``VLMProcessor.glyph_targets``, which a reading objective such as ``plugins.glyph_supervision`` turns
on), training batches of a family with a fixed square patch grid (LLaVA) also carry ``glyph_targets``: for each
image, each patch, the characters printed in it (up to :data:`GLYPH_SLOTS`, in reading order, as class ids of
:data:`GLYPH_CLASSES`; 0 where a slot is empty), built from :attr:`Sample.glyphs`. An image whose glyphs are unknown
gets ``-100`` everywhere. The model never sees them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from framework.data.sample import Sample

IGNORE_INDEX = -100
GLYPH_CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-"
"""Characters with a reading target; class id = index + 1 (0: empty slot). Others printed are left out."""
GLYPH_SLOTS = 3
"""Characters per patch with a target: at 16 px patches, card text puts two to three in one."""
_GLYPH_IDS = {char: index + 1 for index, char in enumerate(GLYPH_CLASSES)}


def glyph_targets(glyphs: list[tuple[str, float, float]] | None, image_side: float, grid: int,
                  slots: int = GLYPH_SLOTS) -> torch.Tensor:
    """Per-patch reading targets of one image: ``[grid * grid, slots]`` class ids (row-major patches).

    A character belongs to the patch holding its centre; a patch's characters are ordered top to bottom, then
    left to right, and those past ``slots`` are dropped. ``glyphs=None`` (unknown) gives ``-100`` everywhere.

    Example:
        >>> glyph_targets([("4", 3.0, 3.0), ("2", 6.0, 3.0), ("A", 12.0, 12.0)], image_side=16, grid=2, slots=2)
        tensor([[ 5,  3],
                [ 0,  0],
                [ 0,  0],
                [11,  0]])
    """
    if glyphs is None:
        return torch.full((grid * grid, slots), IGNORE_INDEX, dtype=torch.long)
    patch = image_side / grid
    rows = [[0] * slots for _ in range(grid * grid)]
    filled = [0] * (grid * grid)
    # Reading order: top to bottom, then left to right; one tensor built at the end (per-patch writes into a tensor
    # cost ten times as much in the data workers).
    for y, x, char in sorted((y, x, char) for char, x, y in glyphs):
        class_id = _GLYPH_IDS.get(char.upper())
        if class_id is None or not (0 <= x < image_side and 0 <= y < image_side):
            continue
        cell = int(y // patch) * grid + int(x // patch)
        if filled[cell] < slots:
            rows[cell][filled[cell]] = class_id
            filled[cell] += 1
    return torch.tensor(rows, dtype=torch.long)


def square_pixels_lookup(image_processor: Any, images: list, *, as_levels: bool = False
                         ) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """``pixel_values`` of RGB images already at a CLIP-style processor's output size, through a lookup table.

    Such a processor's resize and centre crop leave these images unchanged, and its rescale and normalize map each
    8-bit level of a channel to one float: a table of 3 x 256 floats computed with the processor's own arithmetic
    (float64 rescale, float32 normalize) gives its output bit for bit, about three times as fast, which is the data
    workers' largest cost after drawing the images. ``None`` when that does not hold (another processor, other
    sizes or modes, or a step the table does not cover); the caller then runs the processor.

    With ``as_levels`` the lookup is left to whoever holds the batch: ``{"pixel_levels": uint8 [n, 3, side, side],
    "pixel_table": float32 [3, 256]}``, a quarter of the bytes for data workers to hand over, and
    :func:`expand_pixel_levels` turns them into the same ``pixel_values`` (on the GPU, after the copy).
    """
    ip = image_processor
    if not type(ip).__name__.startswith("CLIPImageProcessor") or not images:
        return None
    crop, size = getattr(ip, "crop_size", None) or {}, getattr(ip, "size", None) or {}
    if not (ip.do_center_crop and ip.do_rescale and ip.do_normalize and ip.do_resize):
        return None
    side = crop.get("height")
    if side is None or crop.get("width") != side or size.get("shortest_edge") != side:
        return None
    if any(image.mode != "RGB" or image.size != (side, side) for image in images):
        return None
    levels = (np.arange(256, dtype=np.float64) * ip.rescale_factor).astype(np.float32)
    mean, std = np.asarray(ip.image_mean, dtype=np.float32), np.asarray(ip.image_std, dtype=np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        return None
    table = (levels[None, :] - mean[:, None]) / std[:, None]
    if as_levels:
        codes = np.empty((len(images), 3, side, side), dtype=np.uint8)
        for i, image in enumerate(images):
            codes[i] = np.asarray(image).transpose(2, 0, 1)
        return {"pixel_levels": torch.from_numpy(codes), "pixel_table": torch.from_numpy(table)}
    out = np.empty((len(images), 3, side, side), dtype=np.float32)
    for i, image in enumerate(images):
        for channel, band in enumerate(image.split()):
            np.take(table[channel], np.asarray(band), out=out[i, channel])
    return torch.from_numpy(out)


def expand_pixel_levels(batch: dict[str, Any]) -> dict[str, Any]:
    """Replace a batch's ``pixel_levels`` and ``pixel_table`` (:func:`square_pixels_lookup` with ``as_levels``) by
    the ``pixel_values`` the image processor gives, bit for bit, on the levels' device; in place, and returned. A
    batch without levels is returned as it is."""
    if "pixel_levels" not in batch:
        return batch
    levels = batch.pop("pixel_levels")
    table = batch.pop("pixel_table").to(levels.device)
    channels = torch.arange(table.shape[0], device=levels.device).view(1, -1, 1, 1)
    batch["pixel_values"] = table[channels, levels.long()]
    return batch


class Family:
    """How one VLM family lays out image tokens."""

    model_types: tuple[str, ...] = ()
    image_token: str = "<image>"
    pixel_lookup: bool = True
    """Whether :func:`square_pixels_lookup` may stand in for the image processor (off: always the processor)."""

    def __init__(self, config: Any, tokenizer: Any, image_processor: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def pixel_inputs(self, images: list, *, as_levels: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pixel tensors for ``images`` and the number of placeholder tokens each image takes. ``as_levels``: 8-bit
        levels and their table where the lookup applies (:func:`square_pixels_lookup`), else ``pixel_values``."""
        raise NotImplementedError

    def placeholder(self, n_tokens: int) -> str:
        return self.image_token * n_tokens

    def patch_grid(self) -> int | None:
        """Patches per side of every image, for families with one fixed square grid; ``None`` otherwise."""
        return None

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}


class LlavaFamily(Family):
    """LLaVA: CLIP-like tower, a fixed number of patch tokens per image."""

    model_types = ("llava",)

    def __init__(self, config: Any, tokenizer: Any, image_processor: Any) -> None:
        super().__init__(config, tokenizer, image_processor)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_index)
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "full":
            n += 1
        self.tokens_per_image = n

    def pixel_inputs(self, images: list, *, as_levels: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
        pixels = (square_pixels_lookup(self.image_processor, images, as_levels=as_levels) if self.pixel_lookup
                  else None)
        if pixels is None:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        inputs = pixels if isinstance(pixels, dict) else {"pixel_values": pixels}
        return inputs, [self.tokens_per_image] * len(images)

    def patch_grid(self) -> int | None:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size


class QwenVLFamily(Family):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: dynamic resolution, tokens = grid cells / merge^2."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

    def __init__(self, config: Any, tokenizer: Any, image_processor: Any) -> None:
        super().__init__(config, tokenizer, image_processor)
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.start = tokenizer.convert_ids_to_tokens(config.vision_start_token_id)
        self.end = tokenizer.convert_ids_to_tokens(config.vision_end_token_id)
        self.merge = image_processor.merge_size

    def pixel_inputs(self, images: list, *, as_levels: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
        out = self.image_processor(images=images, return_tensors="pt")  # dynamic patches: no level table
        grid = out["image_grid_thw"]
        counts = [int(g.prod()) // (self.merge**2) for g in grid]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts

    def placeholder(self, n_tokens: int) -> str:
        return self.start + self.image_token * n_tokens + self.end

    def extra_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # Qwen-VL's rotary positions need to know which tokens are image tokens.
        return {"mm_token_type_ids": (input_ids == self.config.image_token_id).long()}


FAMILIES: tuple[type[Family], ...] = (LlavaFamily, QwenVLFamily)


def family_for(config: Any, tokenizer: Any, image_processor: Any) -> Family:
    """The :class:`Family` for an HF config, or a clear error for an unsupported one."""
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family(config, tokenizer, image_processor)
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model: VLM family {config.model_type!r} is not supported yet; supported: {known}")


class VLMProcessor:
    """Encodes :class:`Sample` batches for training (right padding) and generation (left padding).

    Args:
        family: the model family (knows the image placeholder).
        max_length: longest sequence allowed (prompt + answer); longer samples raise.
        pad_to_max_length: training batches (with answers) are padded to ``max_length``, not to their longest row.
        glyph_targets: batches with answers also carry per-patch reading targets (see the module docstring), for
            families with a fixed patch grid.
    """

    def __init__(self, family: Family, max_length: int, pad_to_max_length: bool = False,
                 glyph_targets: bool = False) -> None:
        self.family = family
        self.pad_to_max_length = pad_to_max_length
        self.glyph_targets = glyph_targets
        self.tokenizer = family.tokenizer
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.bos_id = self.tokenizer.bos_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        # One call for the batch: the tokenizer's per-call overhead, not its work, dominated per-text calls.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode(self, samples: list[Sample], *, with_answer: bool = True, pixel_levels: bool = False) -> dict[str, Any]:
        """A padded batch. With ``with_answer`` the answer and EOS follow the prompt and labels are set. With
        ``pixel_levels`` images come as 8-bit levels and their table where the family allows it (a quarter of the
        bytes from a data worker); :func:`expand_pixel_levels` makes ``pixel_values`` of them."""
        images = [s.image for s in samples if s.image is not None]
        pixel, counts = self.family.pixel_inputs(images, as_levels=pixel_levels) if images else ({}, [])
        counts_iter = iter(counts)
        prompts = self._tokens([(self.family.placeholder(next(counts_iter)) if s.image is not None else "")
                                + s.prompt + "\n" for s in samples])
        answers = self._tokens([s.answer for s in samples]) if with_answer else []
        rows: list[tuple[list[int], list[int]]] = []
        for index, sample in enumerate(samples):
            prompt = ([self.bos_id] if self.bos_id is not None else []) + prompts[index]
            answer = answers[index] + [self.eos_id] if with_answer else []
            if len(prompt) + len(answer) > self.max_length:
                raise ValueError(
                    f"{sample.source or sample.task}: prompt + answer take {len(prompt) + len(answer)} tokens but "
                    f"data.max_length is {self.max_length}; raise max_length or shorten the sample"
                )
            rows.append((prompt, answer))
        width = max(len(p) + len(a) for p, a in rows)
        if with_answer and self.pad_to_max_length:
            width = self.max_length
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, answer) in enumerate(rows):
            seq = prompt + answer
            # Generation pads on the left so every prompt ends where new tokens begin.
            start = 0 if with_answer else width - len(seq)
            ids[i, start : start + len(seq)] = torch.tensor(seq)
            mask[i, start : start + len(seq)] = 1
            if with_answer:
                labels[i, len(prompt) : len(seq)] = torch.tensor(answer)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **pixel, **self.family.extra_inputs(ids)}
        grid = self.family.patch_grid() if self.glyph_targets else None
        if with_answer and images and grid:
            # Glyph positions are in the sample's pixels; the image processor resizes every image to one square.
            batch["glyph_targets"] = torch.stack([glyph_targets(s.glyphs, s.image.width, grid)
                                                  for s in samples if s.image is not None])
        if with_answer:
            batch["labels"] = labels
            # Counted here, on the CPU: counting on the GPU in the training step would stall the launch queue.
            batch["num_answer_tokens"] = int((labels != IGNORE_INDEX).sum())
        return batch

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
