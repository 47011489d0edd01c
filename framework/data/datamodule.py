"""The LightningDataModule: a seeded mixture of built-in tasks and user JSONL files.

Every training batch comes from one task (so text-only and image batches never mix padding), and which samples
it holds is a pure function of ``(seed, batch position)``. The position of the next batch is saved in the
checkpoint, so a resumed run reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from framework.data.jsonl import JsonlDataset
from framework.data.sample import Sample
from framework.data.tasks import TASKS, make_task
from framework.processing import expand_pixel_levels

VAL_SEED_OFFSET = 1_000_003  # validation samples come from a different seed than training ones


@dataclass(frozen=True)
class SampleKey:
    task: str
    index: int
    position: int  # global batch position, -1 for evaluation batches


class TaskSources:
    """Maps ``(task, index)`` to a :class:`Sample`; finite sources are cycled through seeded permutations."""

    def __init__(self, sources: dict[str, Any], seed: int) -> None:
        self.sources = sources
        self.seed = seed
        self._perms: dict[tuple[str, int], list[int]] = {}

    def is_finite(self, task: str) -> bool:
        return isinstance(self.sources[task], JsonlDataset)

    def __getitem__(self, key: SampleKey) -> Sample:
        source = self.sources[key.task]
        if not self.is_finite(key.task):
            return source[key.index]
        n = len(source)
        cycle, offset = divmod(key.index, n)
        perm = self._perms.get((key.task, cycle))
        if perm is None:
            perm = list(range(n))
            random.Random(_mix(self.seed, key.task, cycle)).shuffle(perm)
            self._perms = {(key.task, cycle): perm}  # keep one cycle: memory stays bounded
        return source[perm[offset]]


def _mix(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode())


class MixtureBatchSampler(Sampler[list[SampleKey]]):
    """Yields task-homogeneous batches; batch ``p`` of the run is a pure function of ``(seed, p)``.

    Args:
        weights: task name -> sampling weight.
        batch_size: samples per batch on each rank.
        batches_per_epoch: length of one epoch.
        seed: mixture seed.
        rank / world_size: data-parallel shard of this process.
    """

    def __init__(
        self, weights: dict[str, float], batch_size: int, batches_per_epoch: int, seed: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tasks = list(weights)
        self.weights = [weights[t] for t in self.tasks]
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch_at(self, position: int) -> list[SampleKey]:
        task = random.Random(_mix(self.seed, position)).choices(self.tasks, self.weights)[0]
        first = (position * self.world_size + self.rank) * self.batch_size
        return [SampleKey(task, first + i, position) for i in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Each pass runs from the current position to the end of its epoch; the position, not an epoch counter
        # kept by someone else, decides what comes next, so a resumed run continues mid-epoch exactly.
        end = (self.start_position // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self.start_position < end:
            position = self.start_position
            self.start_position += 1
            yield self.batch_at(position)


class Collator:
    """Encodes samples with the model's processor and keeps what the metrics need."""

    def __init__(self, processor: Any, with_prompts: bool = False, pixel_levels: bool = False) -> None:
        self.processor = processor
        self.with_prompts = with_prompts
        self.pixel_levels = pixel_levels  # images as 8-bit levels, expanded after the copy (model_inputs)

    def __call__(self, items: list[Sample]) -> dict[str, Any]:
        batch = self.processor.encode(items, with_answer=True, pixel_levels=self.pixel_levels)
        if self.with_prompts:  # evaluation also generates from the bare prompts
            batch["prompt_inputs"] = self.processor.encode(items, with_answer=False)
        batch["task"] = items[0].task
        batch["samples"] = [
            {"answer": s.answer, "fields": s.fields, "facts": s.facts, "source": s.source} for s in items
        ]
        return batch


class _KeyedDataset:
    """Adapts :class:`TaskSources` to DataLoader's ``dataset[key]`` and tags the batch position."""

    def __init__(self, sources: TaskSources) -> None:
        self.sources = sources

    def __getitem__(self, key: SampleKey) -> tuple[Sample, int]:
        return self.sources[key], key.position


class PositionCollator(Collator):
    def __call__(self, items: list[tuple[Sample, int]]) -> dict[str, Any]:  # type: ignore[override]
        batch = super().__call__([sample for sample, _ in items])
        batch["position"] = items[0][1]
        return batch


class VLMDataModule(pl.LightningDataModule):
    """Built-in synthetic tasks and user JSONL data for VLM training and evaluation.

    Args:
        tasks: task name -> sampling weight for training. Built-in: ``caption``, ``autofill``, ``longcall``;
            a user file from ``train_files`` is a task named after its file stem.
        task_args: per-task constructor arguments, e.g. ``{longcall: {min_words: 300, max_words: 900}}``.
        train_files: JSONL files of ``{image, prompt, answer}`` records used for training.
        val_files: JSONL files used for validation (default: none for user tasks).
        image_size: side of rendered images of the built-in tasks.
        seed: data seed (independent of the model's initialisation seed).
        batch_size: training samples per batch and device.
        val_batch_size: evaluation batch size (default: ``batch_size``).
        batches_per_epoch: length of an epoch; built-in tasks are unbounded, so this only sets the rhythm of
            epoch-end hooks.
        val_samples: validation samples per built-in task.
        max_length: longest prompt + answer in tokens; a longer sample is an error naming it.
        num_workers: DataLoader worker processes (rendering images is CPU work).
        skip_corrupt: skip JSONL records with missing or unreadable images instead of failing (reported).
        pad_to_max_length: pad every training batch to ``max_length`` tokens: fixed shapes, so a compiled model
            (``model.init_args.compile``) never recompiles and CUDA graphs can replay; costs the padded compute.
        pixel_levels: training batches carry images as 8-bit levels and their 3 x 256 table where the image
            processor allows it (CLIP-style, images at its size), expanded to the same ``pixel_values`` after the
            copy to the device: a quarter of the bytes for workers to hand over and pin. Off: float pixels.

    Example::

        data:
          class_path: framework.data.VLMDataModule
          init_args: {tasks: {caption: 1.0, autofill: 1.0}, batch_size: 16, image_size: 64}
    """

    def __init__(
        self,
        tasks: dict[str, float] | None = None,
        task_args: dict[str, dict[str, Any]] | None = None,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        image_size: int = 128,
        seed: int = 0,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        batches_per_epoch: int = 1000,
        val_samples: int = 64,
        max_length: int = 512,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        pad_to_max_length: bool = False,
        pixel_levels: bool = True,
    ) -> None:
        super().__init__()
        self.tasks = dict(tasks if tasks is not None else {"caption": 1.0, "autofill": 1.0})
        self.task_args = {k: dict(v) for k, v in (task_args or {}).items()}
        self.train_files = [str(f) for f in train_files or []]
        self.val_files = [str(f) for f in val_files or []]
        user_tasks = {Path(f).stem for f in self.train_files}
        for name, weight in self.tasks.items():
            if name not in TASKS and name not in user_tasks:
                raise ValueError(
                    f"data.tasks: unknown task {name!r}; built-in tasks are {sorted(TASKS)} and user tasks are the "
                    f"stems of data.train_files ({sorted(user_tasks) or 'none given'})"
                )
            if not (isinstance(weight, (int, float)) and weight > 0 and math.isfinite(weight)):
                raise ValueError(f"data.tasks.{name}: weight must be a positive number, got {weight!r}")
        for name in user_tasks - set(self.tasks):
            self.tasks[name] = 1.0
        for name in self.task_args:
            if name not in TASKS:
                raise ValueError(f"data.task_args: {name!r} is not a built-in task ({sorted(TASKS)})")
        if not self.tasks:
            raise ValueError("data.tasks: give at least one task")
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("batches_per_epoch", batches_per_epoch, 1),
            ("val_samples", val_samples, 0),
            ("max_length", max_length, 8),
            ("num_workers", num_workers, 0),
            ("image_size", image_size, 32),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}: must be an integer >= {low}, got {value!r}")
        self.image_size = image_size
        self.pad_to_max_length = bool(pad_to_max_length)
        if not isinstance(pixel_levels, bool):
            raise ValueError(f"data.pixel_levels: must be true or false, got {pixel_levels!r}")
        self.pixel_levels = pixel_levels
        self.seed = seed
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.batches_per_epoch = batches_per_epoch
        self.val_samples = val_samples
        self.max_length = max_length
        self.num_workers = num_workers
        self.skip_corrupt = skip_corrupt
        self._next_position = 0
        self.train_sources: TaskSources | None = None
        self.val_sets: dict[str, list[Sample]] = {}
        self.skipped: list[str] = []

    # ------------------------------------------------------------------ datasets
    def _synthetic(self, name: str, seed: int) -> Any:
        return make_task(name, seed=seed, image_size=self.image_size, **self.task_args.get(name, {}))

    @override
    def setup(self, stage: str) -> None:
        if self.train_sources is not None:
            return
        sources: dict[str, Any] = {}
        for name in self.tasks:
            if name in TASKS:
                sources[name] = self._synthetic(name, self.seed)
        for path in self.train_files:
            dataset = JsonlDataset(path, task=Path(path).stem, skip_corrupt=self.skip_corrupt)
            self.skipped += dataset.skipped
            sources[Path(path).stem] = dataset
        self.train_sources = TaskSources(sources, self.seed)
        for name in self.tasks:
            if name in TASKS and self.val_samples:
                task = self._synthetic(name, self.seed + VAL_SEED_OFFSET)
                self.val_sets[name] = [task[i] for i in range(self.val_samples)]
        for path in self.val_files:
            dataset = JsonlDataset(path, task=Path(path).stem, skip_corrupt=self.skip_corrupt)
            self.skipped += dataset.skipped
            self.val_sets[Path(path).stem] = [dataset[i] for i in range(len(dataset))]

    def _processor(self) -> Any:
        module = self.trainer.lightning_module if self.trainer is not None else None
        processor = getattr(module, "processor", None)
        if processor is None:
            raise RuntimeError("VLMDataModule needs a VLMModule (with a .processor) in the same Trainer")
        return processor

    def _on_cuda(self) -> bool:
        root = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return getattr(root, "type", None) == "cuda"

    def check_lengths(self, processor: Any) -> None:
        """Fail before training if any user sample is longer than ``max_length``."""
        for name, source in (self.train_sources.sources if self.train_sources else {}).items():
            if isinstance(source, JsonlDataset):
                for i in range(len(source)):
                    processor.encode([source[i]])
        for samples in self.val_sets.values():
            for sample in samples:
                processor.encode([sample])

    # ------------------------------------------------------------------ loaders
    @override
    def train_dataloader(self) -> DataLoader:
        assert self.train_sources is not None, "setup() first"
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = MixtureBatchSampler(self.tasks, self.batch_size, self.batches_per_epoch, self.seed, rank, world)
        sampler.start_position = self._next_position
        return DataLoader(
            _KeyedDataset(self.train_sources),  # type: ignore[arg-type]
            batch_sampler=sampler,
            # Images leave the workers as 8-bit levels: a quarter of the bytes to hand over and pin, which bounded the
            # loader-bound recipes; on_after_batch_transfer makes the same pixel_values of them on the device.
            collate_fn=PositionCollator(self._processor(), pixel_levels=self.pixel_levels),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Page-locked batches copy to the GPU at full bandwidth (a batch of 1024 128-px images is 200 MB).
            pin_memory=self._on_cuda(),
        )

    def training_batch(self, position: int = 0) -> dict[str, Any]:
        """The collated training batch at ``position`` (what the loader yields there), e.g. to count FLOPs."""
        loader = self.train_dataloader()
        keys = loader.batch_sampler.batch_at(position)
        return loader.collate_fn([(self.train_sources[key], position) for key in keys])

    def _eval_loader(self) -> list[DataLoader]:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        loaders = []
        for samples in self.val_sets.values():
            shard = samples[rank::world]
            loaders.append(
                DataLoader(shard, batch_size=self.val_batch_size, collate_fn=Collator(self._processor(), with_prompts=True),
                           num_workers=self.num_workers)
            )
        return loaders

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loader()

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loader()

    # ------------------------------------------------------------------ resume
    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called right before training_step (after any prefetching), so this counts batches really trained on.
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict) and "position" in batch:
            self._next_position = int(batch["position"]) + 1
        # On the device now: the 8-bit pixel levels become pixel_values before any hook or step sees the batch.
        return expand_pixel_levels(batch) if isinstance(batch, dict) else batch

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_position": self._next_position, "seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data.seed is {self.seed} but the checkpoint was trained with seed {state_dict['seed']}; a resumed "
                "run must read the same data"
            )
        self._next_position = int(state_dict.get("next_position", 0))
