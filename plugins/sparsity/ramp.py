"""SparsityRamp: gradual pruning during training (Zhu & Gupta 2017), unstructured or towards N:M."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from framework.storage import INDEX_CODINGS
from plugins.sparsity.config import SCHEDULES, SCORES, check_choice, check_scope, parse_pattern, resolve_sparsity
from plugins.sparsity.layer import InputNormStats, fold_stats, scheduled_sparsity
from plugins.sparsity.masking import MaskedLinears


class SparsityRamp(MaskedLinears):
    """Prune the selected Linear layers gradually while training, from ``initial_sparsity`` to ``final_sparsity``.

    Every ``update_every`` optimizer steps between ``start`` and ``end`` the masks are recomputed from the current
    weights for the scheduled sparsity; pruned weights are held exactly at zero afterwards (gradients masked,
    weights re-masked after each optimizer step), and the last update at ``end`` reaches the target exactly.
    Masks (``weight_mask``) and activation statistics are buffers of the layers, so they are checkpointed.

    With ``pattern: "N:M"`` the ramp goes from dense to N:M along the input dimension (the last dimension of
    ``Linear.weight``, as 2:4 kernels need): at sparsity ``s`` the share ``s / (1 - N/M)`` of the groups of ``M``
    inputs whose ``M - N`` lowest scores weigh least hold exactly N:M, the rest stay dense; at ``end`` every
    group is N:M. This keeps the measured sparsity on the schedule instead of jumping in steps of ``1/M``.

    Args:
        targets: which Linear layers; default: every Linear of the language model except ``lm_head``. Any
            selection works (``include: vision_tower`` or ``projector``); token tables too (``types: [Linear,
            Embedding]``), by magnitude.
        final_sparsity: share of weights pruned at the end, in [0, 1); default 0.5. Implied by an N:M pattern
            (leave unset or give ``1 - N/M``).
        initial_sparsity: sparsity applied at ``start``, in [0, final_sparsity].
        schedule: ``cubic`` (Zhu & Gupta: ``s_t = s_f + (s_i - s_f) (1 - progress)^3``) or ``linear``.
        start: fraction of training (of ``trainer.estimated_stepping_batches``) where pruning begins, in [0, 1).
        end: fraction of training where the final sparsity is reached, in (start, 1].
        start_step: absolute optimizer step overriding ``start``.
        end_step: absolute optimizer step overriding ``end``.
        update_every: masks are recomputed every this many optimizer steps (and at ``end``), >= 1.
        scope: ``layer`` (every layer pruned to the scheduled sparsity), ``row`` (every output row of every layer,
            Wanda's comparison group; for a token table, every token) or ``global`` (one ranking across the
            selected layers of scores divided by each layer's root mean square score over its kept weights).
        score: ``magnitude`` (``|W|``) or ``activation`` (Wanda: ``|W_ij| * ||X_j||_2``, with the per-input
            statistics gathered on the training batches and reduced across ranks before each update).
        stats_steps: with ``score: activation``, how many optimizer steps before each mask update measure their
            inputs (a running mean over the run); ``null``: every step. Measuring every step cost 1.44x in step
            time on the GPU base; one step per update keeps the running mean fresh at a tenth of the hooks.
        pattern: ``unstructured`` or ``N:M`` such as ``2:4`` or ``4:8``.
        name: log namespace and checkpoint key; set it when two ramps prune disjoint layers.
        index_coding: how an N:M export stores kept positions: ``positions`` (2-bit indices for 2:4, the layout
            sparse tensor cores read), ``enumerative`` (each group's pattern rank: 0.65 bits per weight at 2:4,
            0.78 at 4:8) or ``auto`` (the smallest of those and the bitmask).

    Raises:
        ValueError: a value outside its range (the message names the key), ``end`` not after ``start`` (at
            ``__init__`` or, when it depends on the run length, at the start of fit), an input dimension not
            divisible by ``M`` or targets that match nothing (in ``transform``).

    Example::

        trainer:
          callbacks:
            - class_path: plugins.sparsity.SparsityRamp
              init_args: {final_sparsity: 0.75, start: 0.1, end: 0.7, update_every: 20, scope: global}
    """

    def __init__(
        self,
        targets: ModuleSelection | None = None,
        final_sparsity: float | None = None,
        initial_sparsity: float = 0.0,
        schedule: str = "cubic",
        start: float = 0.0,
        end: float = 0.75,
        start_step: int | None = None,
        end_step: int | None = None,
        update_every: int = 10,
        scope: str = "layer",
        score: str = "magnitude",
        pattern: str = "unstructured",
        name: str = "sparsity",
        stats_steps: int | None = 1,
        index_coding: str = "auto",
    ) -> None:
        key = type(self).__name__
        parsed = parse_pattern(pattern, f"{key}.pattern")
        final = resolve_sparsity(final_sparsity, parsed, f"{key}.final_sparsity")
        if not (isinstance(initial_sparsity, (int, float)) and 0.0 <= initial_sparsity <= final):
            raise ValueError(
                f"{key}.initial_sparsity: must be in [0, final_sparsity={final:g}], got {initial_sparsity!r}")
        check_choice(schedule, SCHEDULES, f"{key}.schedule")
        check_scope(scope, parsed, f"{key}.scope")
        check_choice(score, SCORES, f"{key}.score")
        if not (isinstance(start, (int, float)) and 0.0 <= start < 1.0):
            raise ValueError(f"{key}.start: must be a fraction of training in [0, 1), got {start!r}")
        if not (isinstance(end, (int, float)) and 0.0 < end <= 1.0):
            raise ValueError(f"{key}.end: must be a fraction of training in (0, 1], got {end!r}")
        if start_step is not None and start_step < 0:
            raise ValueError(f"{key}.start_step: must be >= 0, got {start_step}")
        if end_step is not None and end_step < 1:
            raise ValueError(f"{key}.end_step: must be >= 1, got {end_step}")
        if start_step is None and end_step is None and end <= start:
            raise ValueError(f"{key}.end: must be after start ({start:g}), got {end:g}")
        if start_step is not None and end_step is not None and end_step <= start_step:
            raise ValueError(f"{key}.end_step: must be after start_step ({start_step}), got {end_step}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"{key}.update_every: must be an integer >= 1, got {update_every!r}")
        if stats_steps is not None and (isinstance(stats_steps, bool) or not isinstance(stats_steps, int)
                                        or stats_steps < 1):
            raise ValueError(f"{key}.stats_steps: must be an integer >= 1 or null (every step), got {stats_steps!r}")
        check_choice(index_coding, (*INDEX_CODINGS, "auto"), f"{key}.index_coding")
        super().__init__(targets, parsed, scope, score, final, name)
        self.index_coding = index_coding
        self.initial_sparsity = float(initial_sparsity)
        self.schedule = schedule
        self.start, self.end = float(start), float(end)
        self.start_step, self.end_step = start_step, end_step
        self.update_every = update_every
        self.stats_steps = stats_steps
        self.last_update_step = -1
        # Resolved against the run length at the start of fit.
        self._start, self._end = (start_step or 0), (end_step or 1)

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        super().transform(model)
        if self.score == "activation":
            for layer in self.layers.values():
                InputNormStats.attach(layer)

    # ------------------------------------------------------------------ schedule
    def resolve_steps(self, total_steps: float) -> tuple[int, int]:
        """Start and end optimizer steps of the ramp for a run of ``total_steps``.

        Raises:
            ValueError: the ramp would end at or before its start, or after the run ends.
        """
        needs_total = self.start_step is None or self.end_step is None
        if needs_total and not math.isfinite(total_steps):
            raise ValueError(f"{self.name}: start/end are fractions of training but the run has no fixed length; "
                             "set trainer.max_steps or give start_step and end_step")
        start = self.start_step if self.start_step is not None else round(self.start * total_steps)
        end = self.end_step if self.end_step is not None else round(self.end * total_steps)
        if end <= start:
            raise ValueError(
                f"{self.name}: the ramp ends at step {end} (end={self.end:g} / end_step={self.end_step}) but starts "
                f"at step {start} (start={self.start:g} / start_step={self.start_step}) of {total_steps:g}; end must "
                "come after start"
            )
        if math.isfinite(total_steps) and end > total_steps:
            raise ValueError(f"{self.name}.end_step: {end} is after the last step ({total_steps:g}) of the run, so the "
                             "final sparsity would never be reached")
        return int(start), int(end)

    def target_at(self, step: int) -> float:
        """Scheduled sparsity at ``step`` (after :meth:`resolve_steps`)."""
        return scheduled_sparsity(step, self._start, self._end, self.initial_sparsity, self.target, self.schedule)

    def is_update_step(self, step: int) -> bool:
        if not self._start <= step <= self._end:
            return False
        return (step - self._start) % self.update_every == 0 or step == self._end

    def _collecting(self, step: int) -> bool:
        """Whether ``step`` measures its inputs: one of the ``stats_steps`` steps before a mask update."""
        if self.score != "activation" or step >= self._end:
            return False
        if self.stats_steps is None or self.stats_steps >= self.update_every:
            return True
        return any(self.is_update_step(step + ahead) for ahead in range(1, self.stats_steps + 1))

    def _update_due(self, step: int) -> bool:
        return step != self.last_update_step and self.is_update_step(step)

    def _maybe_update(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if not self._update_due(step):
            return
        stats = self.activation_stats() if self.score == "activation" else None
        # Before any statistics exist (an update at step 0), activation scores fall back to magnitude.
        with full_parameters(trainer, writeback=True):
            self.update_masks(self.target_at(step), stats)
        self.last_update_step = step

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._end = self.resolve_steps(trainer.estimated_stepping_batches)
        with full_parameters(trainer, writeback=True):
            self.reapply_masks()  # after a checkpoint restore: the invariant "pruned weights are zero" holds
        self.measure()
        self._masked_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._maybe_update(trainer)  # the update at `start` (e.g. step 0 with initial_sparsity > 0)
        for layer in self.layers.values():
            stats = InputNormStats.of(layer)
            if stats is not None:
                stats.enabled = self._collecting(trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._collecting(trainer.global_step):
            fold_stats(list(self.layers.values()), lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Under FSDP, one gather serves both the re-mask after the step and a mask update due now.
        both = self.needs_remask(trainer) and self._update_due(trainer.global_step)
        with full_parameters(trainer, writeback=True) if both else nullcontext():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            for layer in self.layers.values():
                stats = InputNormStats.of(layer)
                if stats is not None:
                    stats.enabled = False
            self._maybe_update(trainer)
        self.log_metric(pl_module, "target_sparsity", self.target_at(trainer.global_step))
        self.log_metric(pl_module, "sparsity", self.sparsity)

    # ------------------------------------------------------------------ state
    @override
    def config_echo(self) -> dict[str, Any]:
        return {**super().config_echo(), "initial_sparsity": self.initial_sparsity, "schedule": self.schedule,
                "start": self.start, "end": self.end, "start_step": self.start_step, "end_step": self.end_step,
                "update_every": self.update_every,
                **({"stats_steps": self.stats_steps} if self.score == "activation" else {})}

    @override
    def plugin_state(self) -> dict[str, Any]:
        return {"last_update_step": self.last_update_step}

    @override
    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.last_update_step = int(state.get("last_update_step", -1))

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        return {**super().summary(model), "schedule": self.schedule, "last_update_step": self.last_update_step}
