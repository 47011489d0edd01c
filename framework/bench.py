"""``vlmc bench``: training throughput and generation speed of a config, printed as a table.

Training is timed through the same Trainer a run uses (model, plugins, precision, data), after warm-up steps,
with the device synchronised around each timed step. Model FLOPs per step are counted once with
``torch.utils.flop_counter`` (forward + backward of a real batch); MFU divides achieved FLOP/s by the device's
peak for the run's precision (known for data-centre GPUs only). Generation is greedy, batch 1, timed per new token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from framework.io import atomic_write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Wall time and token counts of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.padded_tokens: list[int] = []
        self.samples: list[int] = []
        self._start = 0.0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(pl_module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.padded_tokens.append(int(batch["attention_mask"].numel()))
            self.samples.append(int(batch["input_ids"].shape[0]))


def training_flops(module: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one forward + backward of ``batch`` (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    from framework.module import model_inputs

    inputs = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
    counter = FlopCounterMode(display=False)
    with counter:
        module.model(**inputs).loss.backward()
    module.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    return get_available_flops(device, dtype)


def generation_speed(module: Any, sample: Any, new_tokens: int, repeats: int, static_cache: bool) -> float:
    """Greedy decode tokens/s at batch 1 (prefill included, as a user waits for it)."""
    inputs = module.processor.encode([sample], with_answer=False)
    inputs = {k: v.to(module.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(module.model.dtype)
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=module.processor.pad_id)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(module.device)
            start = time.perf_counter()
            module.model.generate(**inputs, **kwargs)
            _sync(module.device)
            if i:  # the first call warms up (and compiles, with a static cache)
                times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="vlmc bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per timed generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations (median reported)")
    parser.add_argument("--static_cache", action="store_true", help="also time HF's static-cache generation")
    parser.add_argument("--out", help="write the numbers as JSON here")
    opts, rest = parser.parse_known_args(argv)
    if opts.steps < 1 or opts.warmup < 0:
        raise SystemExit("vlmc bench: --steps must be >= 1 and --warmup >= 0")

    from framework.cli import build

    overrides = [
        f"--trainer.max_steps={opts.warmup + opts.steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
    ]
    cli = build([a for c in opts.config for a in ("--config", c)] + rest + overrides, run=False)
    timer = StepTimer(opts.warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module, trainer = cli.model, cli.trainer

    datamodule = cli.datamodule
    batch = datamodule.train_dataloader().collate_fn([(datamodule.train_sources[k], 0) for k in
                                                       datamodule.train_dataloader().batch_sampler.batch_at(0)])
    module.train()
    flops = training_flops(module, batch)
    flops_per_padded_token = flops / batch["attention_mask"].numel()
    step_time = statistics.median(timer.times)
    padded_per_step = statistics.mean(timer.padded_tokens)
    precision = str(trainer.precision)
    peak = peak_flops(module.device, precision)
    achieved = flops_per_padded_token * padded_per_step / step_time
    module.eval()
    sample = next(iter(datamodule.val_sets.values()))[0] if datamodule.val_sets else None
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(module.device) if module.device.type == "cuda" else "cpu",
        "precision": precision,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "batch_size": statistics.mean(timer.samples),
        "steps_per_s": 1 / step_time,
        "tokens_per_s": statistics.mean(timer.tokens) / step_time,
        "padded_tokens_per_s": padded_per_step / step_time,
        "tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
    }
    if sample is not None:
        results["generate_tokens_per_s"] = generation_speed(module, sample, opts.new_tokens, opts.repeats, False)
        if opts.static_cache:
            results["generate_static_tokens_per_s"] = generation_speed(module, sample, opts.new_tokens, opts.repeats,
                                                                       True)
    width = max(len(k) for k in results)
    print("\n".join(f"{k.ljust(width)}  {_fmt(v)}" for k, v in results.items()))
    if opts.out:
        atomic_write_json(Path(opts.out), {**results, "configs": opts.config, "argv": argv})
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    import sys

    print(json.dumps(main(sys.argv[1:])))
