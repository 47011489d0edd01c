"""VLMModule: a Hugging Face VLM as a LightningModule.

Trains with the LM loss on answer tokens, validates with teacher-forced loss and greedy generation scored by the
task metrics, and hands the model to every compression plugin in ``configure_model`` (the plugin contract in
:mod:`framework.plugin`).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from framework.compiling import CUDA_GRAPH_MODES, compile_blocks
from framework.metrics import MeanTokenLoss, TaskMetrics
from framework.models import load_vlm
from framework.plugin import check_plugins, find_plugins, writes_step_logs
from framework.processing import VLMProcessor, expand_pixel_levels, family_for
from framework.sharding import fsdp_root, shard_model

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def model_inputs(batch: dict[str, Any], *, labels: bool = True) -> dict[str, Any]:
    """The tensors of a batch that the HF forward takes. 8-bit pixel levels are expanded first, in the batch: the
    trainer's batches already were (``VLMDataModule.on_after_batch_transfer``), a loader iterated directly's not."""
    expand_pixel_levels(batch)
    keys = MODEL_INPUTS if labels else MODEL_INPUTS[:2] + MODEL_INPUTS[3:]
    return {k: batch[k] for k in keys if k in batch}


def training_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """:func:`model_inputs` of a teacher-forced batch, without its attention mask.

    Such batches are right-padded (:meth:`framework.processing.VLMProcessor.encode`): every real token precedes
    the padding, so causal attention alone keeps them from seeing it, and padded positions carry no labels. Position
    ids do not change either (LLaVA counts from 0; Qwen-VL's 3D positions run over the real tokens first). Without
    the mask the attention layers take their causal fast path, and transformers skips the per-step check of the
    mask, a read-back to the host (a sync on a GPU). Generation batches are left-padded and keep their mask.

    ``use_cache`` is off: a teacher-forced forward is never continued, and with it on transformers fills a KV cache
    on every step, whose per-layer index makes a compiled block recompile for each layer.
    """
    inputs = model_inputs(batch)
    if "labels" in inputs:
        inputs.pop("attention_mask", None)
    inputs["use_cache"] = False
    return inputs


def check_strategy(trainer: Any, compile: bool = False) -> None:
    """Refuse strategies whose sharding the module and its plugins do not apply or handle.

    Lightning's ``ModelParallelStrategy`` runs here as FSDP2 (:func:`framework.sharding.shard_model` in
    ``configure_model``): data parallel over every device, so ``tensor_parallel_size`` must be 1, and checkpoints whole
    (``save_distributed_checkpoint: false``), written atomically and read by ``vlmc export``.

    Raises:
        ValueError: naming the ``trainer.strategy`` key: tensor parallelism, sharded checkpoints, or FSDP2 with
            compiled blocks.
    """
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    strategy = trainer.strategy
    tensor_parallel = strategy._tensor_parallel_size
    if tensor_parallel != 1:
        raise ValueError("trainer.strategy.init_args.tensor_parallel_size: ModelParallelStrategy runs as FSDP2 data "
                         f"parallelism here; tensor parallelism is not supported, got {tensor_parallel!r}: set it to "
                         "1 and data_parallel_size to the number of devices")
    if strategy._save_distributed_checkpoint:
        raise ValueError("trainer.strategy.init_args.save_distributed_checkpoint: must be false (whole checkpoints, "
                         "written to a temporary file and renamed, which vlmc export reads); got true")
    if compile:
        raise ValueError("model.init_args.compile: compiled blocks under ModelParallelStrategy (FSDP2) are not "
                         "supported; set it to false, or use strategy: fsdp or ddp")


class VLMModule(pl.LightningModule):
    """A VLM trained on answer tokens, evaluated by generation.

    Args:
        model: tiny spec JSON (built offline), local HF folder, or hub id of an image-text-to-text model.
        text_gguf: GGUF file (or ``smollm2``) loaded into the text tower of a tiny spec.
        tokenizer: tokenizer override (file or folder).
        trust_remote_code: allow checkpoint code; off unless you trust the checkpoint.
        dtype: weight dtype after loading (``float32``, ``bfloat16``, ``float16``); mixed precision is the
            Trainer's ``precision``.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).
        betas: AdamW betas.
        warmup_fraction: share of training spent warming the learning rate up linearly.
        min_lr_ratio: final learning rate of the cosine decay, as a fraction of ``lr``.
        decay_fraction: share of training, at its end, over which the cosine decay runs; until then the learning
            rate stays at ``lr`` after warm-up (warmup-stable-decay). 1.0: decay from the end of warm-up on.
        lr_multipliers: ``{regex: factor}``: parameters whose qualified name matches a regex (``re.search``, the
            first match in order wins) train at ``factor * lr`` on the same schedule, e.g. ``{vision_tower: 3.0}``.
            Plugins' own parameter groups keep their rates.
        max_new_tokens: generation length during validation.
        generate_batches: validation batches per task that are also scored by generation (-1: all).
        max_length: default longest sequence when no datamodule sets it.
        compile: compile each transformer block with ``torch.compile`` (regional compilation: one graph reused by
            every layer; parameter names are unchanged, so checkpoints and exports are the same; see
            :mod:`framework.compiling`).
        compile_mode: ``torch.compile`` mode of those blocks: ``default``, ``reduce-overhead`` (CUDA graphs: fewer
            kernel launches, for training steps only; pair it with ``data.init_args.pad_to_max_length`` so shapes
            stay fixed),
            ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        compile_dynamic: ``dynamic`` of those ``torch.compile`` calls. ``auto`` (the default): static sizes under
            ``reduce-overhead``/``max-autotune`` with ``data.init_args.pad_to_max_length`` (the padded training steps
            never change shape; static sizes compile in seconds and keep size arithmetic, such as a plugin's
            per-tensor gradient scale, out of the graphs as host-side kernels), symbolic sizes otherwise. ``true``
            compiles symbolic sizes from the start, so generation's growing sequence does not recompile; ``false``
            or ``null`` start from the first shapes seen (``null`` turns a size symbolic once it changes).

    Example::

        model:
          class_path: framework.VLMModule
          init_args: {model: experiments/models/llava-tiny.json, lr: 2.0e-3}
    """

    def __init__(
        self,
        model: str = "experiments/models/llava-tiny.json",
        text_gguf: str | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 1.0,
        lr_multipliers: dict[str, float] | None = None,
        max_new_tokens: int = 64,
        generate_batches: int = 1,
        max_length: int = 512,
        compile: bool = False,
        compile_mode: str = "default",
        compile_dynamic: bool | None | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"model.lr: must be a positive number, got {lr}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"model.warmup_fraction: must be in [0, 1), got {warmup_fraction}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"model.decay_fraction: must be in (0, 1], got {decay_fraction}")
        self._train_started: float | None = None  # time.monotonic() at the start of fit's training loop
        self._validation_started = 0.0
        self._lr_multipliers = []
        for pattern, factor in (lr_multipliers or {}).items():
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"model.lr_multipliers: {pattern!r} is not a valid regex ({err})") from err
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
                    or not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"model.lr_multipliers: the factor of {pattern!r} must be a positive number, "
                                 f"got {factor!r}")
            self._lr_multipliers.append((pattern, compiled, float(factor)))
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens: must be >= 1, got {max_new_tokens}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode: must be one of {', '.join(map(repr, COMPILE_MODES))}, "
                             f"got {compile_mode!r}")
        if not (compile_dynamic is None or isinstance(compile_dynamic, bool) or compile_dynamic == "auto"):
            raise ValueError(f"model.compile_dynamic: must be true, false, null or 'auto', got {compile_dynamic!r}")
        if generate_batches < -1:
            raise ValueError(f"model.generate_batches: must be -1 (all) or >= 0, got {generate_batches}")
        self.save_hyperparameters()
        loaded = load_vlm(model, text_gguf=text_gguf, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                          dtype=dtype)
        # from_pretrained returns a model in eval mode; Lightning keeps submodules' modes during fit, so a loaded
        # checkpoint would train with dropout (and any mode-dependent plugin behaviour) switched off.
        self.model = loaded.model.train()
        self.tokenizer = loaded.tokenizer
        self.image_processor = loaded.image_processor
        self.processor = VLMProcessor(family_for(self.model.config, loaded.tokenizer, loaded.image_processor),
                                      max_length)
        self._compiled = False
        self.val_metrics = nn.ModuleDict()
        self.val_losses = nn.ModuleDict()

    # ------------------------------------------------------------------ structure
    @override
    def configure_model(self) -> None:
        check_strategy(self._trainer, compile=bool(self.hparams.compile))
        plugins = find_plugins(self._trainer)
        for plugin in plugins:
            plugin.transform(self.model)
        check_plugins(plugins, self.model)
        if self._trainer is not None and isinstance(self._trainer.strategy, ModelParallelStrategy):
            # After the plugins: their masks, quantizers and gates are sharded with the blocks that hold them.
            shard_model(self.model, self._trainer.strategy.device_mesh["data_parallel"])
        if self.hparams.compile and not self._compiled:
            # After the plugins: their masks and hooks are part of what gets compiled.
            compile_blocks(self.model, self.hparams.compile_mode, dynamic=self.compile_dynamic())
            self._compiled = True

    def compile_dynamic(self) -> bool | None:
        """``dynamic`` of the blocks' ``torch.compile``: ``model.compile_dynamic``, or for ``auto`` static sizes where
        every compiled call has one shape (CUDA-graph modes run only padded training steps compiled) and symbolic
        sizes otherwise (generation's growing sequence would recompile per length). Static sizes compiled the GPU
        base in seconds instead of ~100 s, and QAT under CUDA graphs crashed or hung with symbolic ones."""
        dynamic = self.hparams.get("compile_dynamic", True)  # checkpoints from before the option: symbolic
        if dynamic != "auto":
            return dynamic
        return not (self.hparams.compile_mode in CUDA_GRAPH_MODES and self.processor.pad_to_max_length)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        self.match_processor(datamodule)
        if hasattr(datamodule, "check_lengths"):
            datamodule.check_lengths(self.processor)
        for task in getattr(datamodule, "val_sets", {}):
            if task not in self.val_metrics:
                self.val_metrics[task] = TaskMetrics(task)
                self.val_losses[task] = MeanTokenLoss()

    def match_processor(self, datamodule: Any) -> None:
        """Encode as ``datamodule`` batches: its ``max_length``, and padding to it where it pads training batches."""
        if hasattr(datamodule, "max_length"):
            self.processor.max_length = datamodule.max_length
        self.processor.pad_to_max_length = bool(getattr(datamodule, "pad_to_max_length", False))

    # ------------------------------------------------------------------ training
    @override
    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        plugins = find_plugins(self._trainer)
        inputs = training_inputs(batch)
        if any(plugin.needs_hidden_states for plugin in plugins):
            inputs["output_hidden_states"] = True
        out = self.model(**inputs)
        # A progress-bar metric is read back to the host every step (a sync on a GPU): only when a bar shows it.
        # Otherwise step metrics are logged only on the steps the trainer writes (each call costs host time).
        shown = self._trainer is not None and self._trainer.progress_bar_callback is not None
        logging = shown or writes_step_logs(self._trainer)
        if logging:
            self.log("train/loss", out.loss, prog_bar=shown, batch_size=batch["num_answer_tokens"])
        loss = out.loss
        for plugin in plugins:
            for term, value in plugin.loss_terms(self.model, batch, out).items():
                if logging:
                    self.log(f"compression/{plugin.name}/loss_{term}", value.detach(), on_step=True, on_epoch=False)
                loss = loss + value
        return loss

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        plugin_groups, owned = [], set()
        for plugin in find_plugins(self._trainer):
            for group in plugin.param_groups(self.model):
                params = [p for p in group["params"] if p.requires_grad]
                clash = [p for p in params if id(p) in owned]
                if clash:
                    raise ValueError(f"{plugin.name}: param_groups() lists parameters another plugin already owns")
                owned.update(id(p) for p in params)
                plugin_groups.append({"weight_decay": 0.0, **group, "params": params})
        # (decayed?, lr factor) -> parameters. Norms, biases and embeddings are not decayed (the usual recipe).
        buckets: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        matched = {pattern: 0 for pattern, _, _ in self._lr_multipliers}
        for name, param in self.model.named_parameters():
            if not param.requires_grad or id(param) in owned:
                continue
            factor = 1.0
            for pattern, regex, pattern_factor in self._lr_multipliers:
                if regex.search(name):
                    factor, matched[pattern] = pattern_factor, matched[pattern] + 1
                    break
            decayed = not (param.ndim < 2 or "embed" in name or "norm" in name)
            buckets.setdefault((decayed, factor), []).append(param)
        unmatched = [pattern for pattern, count in matched.items() if count == 0]
        if unmatched:
            raise ValueError(f"model.lr_multipliers: {unmatched} match no trainable parameter of the model "
                             "(patterns are searched in qualified names such as 'model.vision_tower.…')")
        if not buckets and not plugin_groups:
            raise ValueError("no trainable parameters: every parameter is frozen by the configured plugins")
        groups = [{"params": params, "weight_decay": hp.weight_decay if decayed else 0.0,
                   **({"lr": hp.lr * factor} if factor != 1.0 else {})}
                  for (decayed, factor), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
        groups += [g for g in plugin_groups if g["params"]]
        scheduled = [g.pop("lr_schedule", True) for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas),
                                      fused=self._fused_optimizer())
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * hp.warmup_fraction)
        # .get: checkpoints saved before the option existed decay over the whole run, as they did.
        decay_from = max(warmup, total - int(round(total * hp.get("decay_fraction", 1.0))))

        def schedule_for(follows: bool) -> Any:
            return (lambda step: lr_factor(step, total, warmup, hp.min_lr_ratio, decay_from)) if follows \
                else (lambda step: 1.0)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule_for(f) for f in scheduled])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_optimizer(self) -> bool:
        """Whether AdamW runs as one fused kernel per parameter group: on CUDA, unless gradients are clipped where
        only Lightning can clip them: under fp16 AMP (its gradient scaler must unscale first, which a fused step does
        internally) and under FSDP (sharded gradients need FSDP's own norm). Plugins' groups (their own learning
        rates, no decay, ``maximize`` for Lagrange multipliers) are per-group options the fused kernel takes too."""
        from lightning.pytorch.strategies import FSDPStrategy

        trainer = self.trainer
        lightning_clips = (getattr(trainer.precision_plugin, "scaler", None) is not None
                           or isinstance(trainer.strategy, FSDPStrategy))
        return self.device.type == "cuda" and not (trainer.gradient_clip_val and lightning_clips)

    @override
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, although without a gradient
        # scaler (bf16, fp32) there is nothing to unscale: clip here so the step keeps its fused kernel.
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if (gradient_clip_algorithm or "norm") == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(self._trainer.strategy, ModelParallelStrategy):
            fill_missing_optimizer_state(checkpoint, list(self.parameters()))

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        task = batch["task"]
        out = self.model(**model_inputs(batch), use_cache=False)
        self.val_losses[task].update(out.logits, batch["labels"])
        limit = self.hparams.generate_batches
        if limit == -1 or batch_idx < limit:
            predictions = self.generate(batch["prompt_inputs"])
            self.val_metrics[task].update(predictions, batch["samples"])

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _log_eval(self, stage: str) -> None:
        # Every rank computes every task's metrics (compute() syncs across ranks, so skipping a task on a rank that
        # saw none of its batches would hang the others); values are synced already, hence sync_dist=False.
        losses = []
        for task, loss_metric in self.val_losses.items():
            loss = loss_metric.compute()
            loss_metric.reset()
            metrics = self.val_metrics[task]
            values = metrics.compute()
            metrics.reset()
            if torch.isnan(loss):  # no batch of this task was evaluated on any rank
                continue
            losses.append(loss)
            self.log(f"{stage}/{task}/loss", loss, sync_dist=False)
            self.log(f"{stage}/{task}/ppl", torch.exp(loss), sync_dist=False)
            for name, value in values.items():
                self.log(f"{stage}/{task}/{name}", value, sync_dist=False)
        if losses:
            self.log(f"{stage}/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=False)

    @override
    def on_train_start(self) -> None:
        self._train_started = time.monotonic()

    @override
    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.monotonic()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        # Wall clock (host time only, no synchronisation): where a time-limited run's minutes went.
        now = time.monotonic()
        self.log("time/validation_s", now - self._validation_started, sync_dist=False)
        if self._train_started is not None:
            self.log("time/since_train_start_s", now - self._train_started, sync_dist=False)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    @torch.no_grad()
    def generate(self, prompt_inputs: dict[str, Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers for a left-padded prompt batch (see :meth:`VLMProcessor.encode`)."""
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in prompt_inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        width = inputs["input_ids"].shape[1]
        # Sharded weights are gathered in every forward, a collective: ranks keep stepping until all have finished.
        sharded = self._trainer is not None and self._trainer.world_size > 1 and fsdp_root(self) is not None
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens or self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=self.processor.pad_id,
            eos_token_id=self.processor.eos_id,
            synced_gpus=sharded,
        )
        return self.processor.decode(output[:, width:])


def fill_missing_optimizer_state(checkpoint: dict[str, Any], params: list[nn.Parameter]) -> None:
    """Give every trainable parameter without AdamW state (one no batch has reached yet, or never will: a vision
    tower's unused last norm) the state AdamW starts from (step 0, zero moments) in a whole checkpoint's optimizer
    states, keyed by parameter index as Lightning saves them under FSDP2. Its loading requires a state for every
    trainable parameter; a fresh state and none are the same to AdamW, which skips parameters without gradients.
    """
    for optimizer_state in checkpoint.get("optimizer_states", []):
        state = optimizer_state.get("state", {})
        template = next((entry for entry in state.values() if entry), None)
        if template is None:  # other ranks' states are empty; no step yet
            continue
        listed = {index for group in optimizer_state.get("param_groups", []) for index in group["params"]}
        for index in sorted(listed - state.keys()):
            if isinstance(index, int) and index < len(params) and params[index].requires_grad:
                shape = params[index].shape
                state[index] = {key: torch.zeros(shape, dtype=value.dtype) if value.dim() else torch.zeros_like(value)
                                for key, value in template.items()}


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, decay_from: int | None = None) -> float:
    """Linear warm-up, then constant until ``decay_from`` (default: the end of warm-up), then cosine decay to
    ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    start = warmup if decay_from is None else max(warmup, decay_from)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, total - start))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
