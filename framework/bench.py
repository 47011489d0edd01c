"""``vlmc bench``: training throughput and generation speed of a config, printed as a table.

Training is timed through the same Trainer a run uses (model, plugins, precision, data), after warm-up steps,
with the device synchronised around each timed step. Model FLOPs per step are counted once with
``torch.utils.flop_counter`` (forward + backward of a real batch); MFU divides achieved FLOP/s by the device's
peak for the run's precision (known for data-centre GPUs only). Generation is greedy, batch 1, timed per new token.
``--loader N`` builds N training batches in-process and reports what one loader worker delivers; with
``--loader_workers K`` it also times N batches out of the run's own DataLoader with K worker processes (after their
prefetched batches), which counts what in-process timing misses: the workers sharing the cores, and the batches'
way to the training process.
``--profile N`` runs N more steps under ``torch.profiler`` after the timed ones and reports where the step goes:
the share of wall time the device is busy (far below 1: the step waits on the host, i.e. launch- or
Python-bound), the share of device time in matrix multiplies, and the most expensive operators.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from framework.io import atomic_write_json
from framework.plugin import find_plugins


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Time and token counts of each training step after ``warmup`` steps.

    ``times`` spans one batch end to the next (data loading included, what a run really gets); ``compute_times``
    spans batch start to batch end (forward, backward and optimizer only).
    """

    def __init__(self, warmup: int, steps: int | None = None) -> None:
        self.warmup = warmup
        self.until = None if steps is None else warmup + steps  # later steps (e.g. profiled ones) are not timed
        self.times: list[float] = []
        self.compute_times: list[float] = []
        self._last_end: float | None = None
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
        now = time.perf_counter()
        if batch_idx >= self.warmup and (self.until is None or batch_idx < self.until):
            # The first step after start-up has no previous end to measure from: count its compute only.
            self.times.append(now - (self._last_end if self._last_end is not None else self._start))
            self.compute_times.append(now - self._start)
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.padded_tokens.append(int(batch["attention_mask"].numel()))
            self.samples.append(int(batch["input_ids"].shape[0]))
        self._last_end = now


# Operators whose time is matrix multiplication (dense GEMMs, attention's batched GEMMs and fused attention).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
              "aten::scaled_dot_product")


class OpProfile(pl.Callback):
    """Profile training steps ``[start, start + steps)`` with ``torch.profiler`` and summarise them.

    ``result`` (see :func:`summarise_profile`): ``wall_s`` of the profiled steps, ``device_busy_share`` (device
    kernel time over wall time; CUDA only), ``matmul_share`` (matrix-multiply operators' share of the kernel time, or
    of self CPU time on a CPU), and ``top_ops``: the ``top`` operators by the time of the kernels they launched.
    """

    def __init__(self, start: int, steps: int, top: int = 15) -> None:
        self.start, self.steps, self.top = start, steps, top
        self._profiler: Any = None
        self._wall = 0.0
        self._t0 = 0.0
        self.result: dict[str, Any] = {}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            _sync(pl_module.device)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
            self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._profiler is not None and batch_idx == self.start + self.steps - 1:
            _sync(pl_module.device)
            self._wall = time.perf_counter() - self._t0
            self._profiler.__exit__(None, None, None)
            self.result = summarise_profile(self._profiler.key_averages(), pl_module.device.type == "cuda",
                                            self.steps, self._wall, self.top)
            self._profiler = None


def summarise_profile(events: Any, on_device: bool, steps: int, wall_s: float, top: int = 15) -> dict[str, Any]:
    """Shares of profiled time from ``torch.profiler``'s ``key_averages()``.

    The profiler lists each operator (a host event whose self device time is that of the kernels it launched), each
    kernel once more as a device event, and user annotations (``Optimizer.step#...``, ``ProfilerStep#...``) whose
    device span covers other kernels. Counting all three counts kernels twice or three times, so the total is the
    device events' time without annotations (what ``torch.profiler``'s own table sums) and the ranking is by
    operator. On a CPU everything is host time: operators without annotations.
    """
    def is_device_event(event: Any) -> bool:
        return getattr(event, "device_type", None) not in (None, torch.autograd.DeviceType.CPU)

    def device_time(event: Any) -> float:  # microseconds
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))

    events = [e for e in events if not getattr(e, "is_user_annotation", False)]
    operators = [e for e in events if not is_device_event(e)]
    def cpu_time(event: Any) -> float:
        return float(event.self_cpu_time_total)

    op_time = device_time if on_device else cpu_time
    total = sum(device_time(e) for e in events if is_device_event(e)) if on_device else sum(map(cpu_time, operators))
    rows = sorted(operators, key=op_time, reverse=True)
    matmul = sum(op_time(e) for e in operators if e.key.startswith(MATMUL_OPS))
    summary = {
        "profiled_steps": steps,
        "wall_s": wall_s,
        "time_basis": "device kernel time" if on_device else "self CPU time",
        "device_busy_share": (total / 1e6 / wall_s) if on_device and wall_s else None,
        "matmul_share": matmul / total if total else None,
        "top_ops": [{"op": e.key, "calls": int(e.count), "self_ms": op_time(e) / 1e3,
                     "share": op_time(e) / total if total else 0.0} for e in rows[:top]],
    }
    if on_device:
        # Where the host's time goes (operator dispatch, kernel launches, synchronisations): on a launch-bound
        # step this, not the kernels, sets the pace. Shares are of the profiled wall time of the main thread.
        host = sorted(operators, key=cpu_time, reverse=True)
        host_total = sum(map(cpu_time, operators))
        summary["host_ops_share"] = host_total / 1e6 / wall_s if wall_s else None
        summary["host_top_ops"] = [{"op": e.key, "calls": int(e.count), "self_ms": cpu_time(e) / 1e3,
                                    "share_of_wall": cpu_time(e) / 1e6 / wall_s if wall_s else 0.0}
                                   for e in host[:top]]
    return summary


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


def plain_loop_step_time(module: Any, loader: Any, steps: int, warmup: int, precision: str,
                         clip: float | None = None) -> float:
    """Median step time of a bare PyTorch loop (autocast, fused AdamW, gradient-norm clipping at ``clip`` when
    given, as the run's trainer does) on the same model and data: the floor a framework run is compared with."""
    from framework.module import training_inputs

    device = module.device
    autocast_dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else None
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    times = []
    batches = iter(loader)
    for i in range(warmup + steps):
        batch = next(batches)
        # Copied first, then expanded on the device (8-bit pixel levels), as the framework's step does.
        inputs = training_inputs({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                  for k, v in batch.items()})
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = module.model(**inputs).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Dense peak FLOP/s of GPUs Lightning's table lacks: the H200 has the H100 SXM's tensor cores (more memory only).
EXTRA_PEAK_FLOPS = {"h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12,
                             torch.float32: 66.9e12}}


def loader_throughput(datamodule: Any, workers: int, batches: int) -> dict[str, float]:
    """Batches per second out of the training DataLoader with ``workers`` worker processes, in steady state.

    The workers first fill their prefetch queues (the DataLoader's ``prefetch_factor`` batches each), which a short
    run mistakes for throughput, so that many batches are taken untimed first; the next ``batches`` are timed. This is
    the step rate the loader alone allows (``loader_steps_per_s_bound``), measured beside the other way of handing
    images over (``data.pixel_levels`` on and off: ``..._pixel_levels``, ``..._float_pixels``)."""
    configured, levels = datamodule.num_workers, datamodule.pixel_levels

    def rate(pixel_levels: bool) -> float:
        datamodule.pixel_levels = pixel_levels
        loader = datamodule.train_dataloader()
        iterator = iter(loader)
        for _ in range(loader.prefetch_factor * workers):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        del iterator, loader  # stops the workers
        return batches / seconds

    datamodule.num_workers = workers
    try:
        # Side by side, the configured pixels last: images as 8-bit levels (data.pixel_levels) against float pixels.
        rates = {setting: rate(setting) for setting in (not levels, levels)}
    finally:
        datamodule.num_workers, datamodule.pixel_levels = configured, levels
    return {"loader_workers": workers, "loader_steps_per_s_bound": rates[levels],
            "loader_steps_per_s_bound_pixel_levels": rates[True], "loader_steps_per_s_bound_float_pixels": rates[False]}


def loader_speed(datamodule: Any, batches: int, steps_per_s: float) -> dict[str, float]:
    """Time ``batches`` training batches built in this process, as one loader worker builds them.

    ``loader_workers_needed`` is how many such workers keep up with ``steps_per_s`` (cores permitting): far below the
    configured ``num_workers`` means the loader does not bound the step rate. The same batches are also built with
    the HF image processor itself instead of the pixel lookup table (``loader_batch_ms_processor``), side by side.
    """
    family = datamodule._processor().family

    def seconds_for(lookup: bool) -> tuple[float, int]:
        family.pixel_lookup = lookup
        start = time.perf_counter()
        built = sum(int(datamodule.training_batch(p)["input_ids"].shape[0]) for p in range(1, batches + 1))
        return time.perf_counter() - start, built

    datamodule.training_batch(0)  # fonts, tokenizer and caches warm
    lookup = family.pixel_lookup
    try:
        plain, _ = seconds_for(False)
        seconds, samples = seconds_for(lookup)
    finally:
        family.pixel_lookup = lookup
    return {"loader_batch_ms": 1e3 * seconds / batches, "loader_samples_per_s_per_worker": samples / seconds,
            "loader_workers_needed": steps_per_s * seconds / batches,
            "loader_batch_ms_processor": 1e3 * plain / batches}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    name = torch.cuda.get_device_name(device).lower()
    for chip, peaks in EXTRA_PEAK_FLOPS.items():
        if chip in name:
            # float32 counts TF32 tensor cores where matmul precision allows them, as Lightning's table does.
            tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
            return peaks["tf32" if tf32 else dtype]
    return get_available_flops(device, dtype)


def generation_speed(model: Any, processor: Any, sample: Any, new_tokens: int, repeats: int,
                     static_cache: bool) -> float:
    """Greedy decode tokens/s at batch 1 (prefill included, as a user waits for it)."""
    device = next(model.parameters()).device
    inputs = processor.encode([sample], with_answer=False)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=processor.pad_id)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            model.generate(**inputs, **kwargs)
            _sync(device)
            if i:  # the first call warms up (and compiles, with a static cache)
                times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def timed_fit(args: list[str], steps: int, warmup: int, *, drop_plugins: bool = False,
              profile: OpProfile | None = None) -> tuple[Any, StepTimer]:
    """Build the config's run without logging, checkpoints or validation and time ``steps`` training steps (then
    run ``profile``'s steps under the profiler, when given)."""
    from framework.cli import build

    total_steps = warmup + steps + (profile.steps if profile is not None else 0)
    overrides = [
        f"--trainer.max_steps={total_steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
    ]
    cli = build(args + overrides, run=False, save_config=False)  # nothing of a timing run is kept
    if drop_plugins:
        plugins = find_plugins(cli.trainer)
        cli.trainer.callbacks[:] = [cb for cb in cli.trainer.callbacks if cb not in plugins]
    timer = StepTimer(warmup, steps)
    cli.trainer.callbacks.append(timer)
    if profile is not None:
        cli.trainer.callbacks.append(profile)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, timer


def plugin_overhead(args: list[str], steps: int, warmup: int, with_plugins: StepTimer,
                    names: list[str]) -> dict[str, Any]:
    """Training overhead of a config's plugins: the same steps timed again with the plugins removed.

    Means, not medians: plugins often do their work every few steps (mask updates), and that work is overhead.
    """
    if not names:
        raise SystemExit("vlmc bench --without_plugins: the config has no compression plugins to compare against")
    _, without = timed_fit(args, steps, warmup, drop_plugins=True)
    mean_with = statistics.mean(with_plugins.compute_times)
    mean_without = statistics.mean(without.compute_times)
    return {
        "plugins": ",".join(names),
        "step_s_with_plugins": mean_with,
        "step_s_without_plugins": mean_without,
        "plugin_overhead": mean_with / mean_without,
        # Medians drop the steps where a plugin does its periodic work; a large gap to the mean ratio says so.
        "plugin_overhead_median": (statistics.median(with_plugins.compute_times)
                                   / statistics.median(without.compute_times)),
        # Every timed step, so a trend (a recompile, a fallback to eager) shows apart from periodic work.
        "step_ms_with_plugins": [round(1e3 * t, 3) for t in with_plugins.compute_times],
        "step_ms_without_plugins": [round(1e3 * t, 3) for t in without.compute_times],
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="vlmc bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per timed generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations (median reported)")
    parser.add_argument("--static_cache", action="store_true", help="also time HF's static-cache generation")
    parser.add_argument("--plain", action="store_true", help="also time a bare PyTorch loop on the same model and data")
    parser.add_argument("--without_plugins", action="store_true",
                        help="also time the same config with its compression plugins removed, in the same process, "
                             "and report the plugins' training overhead (mean step time with / without)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed steps, profile N more and report device busy time, the matmul share "
                             "and the top operators")
    parser.add_argument("--loader", type=int, default=0, metavar="N",
                        help="also build N training batches in this process (rendering, tokenizing, collating, as one "
                             "loader worker does) and report samples/s per worker and the workers the step rate needs")
    parser.add_argument("--loader_workers", type=int, default=0, metavar="K",
                        help="with --loader N: also time N batches out of the training DataLoader with K worker "
                             "processes, after their prefetched ones, and report the step rate the loader allows")
    parser.add_argument("--out", help="write the numbers as JSON here")
    opts, rest = parser.parse_known_args(argv)
    if opts.steps < 1 or opts.warmup < 0 or opts.profile < 0 or opts.loader < 0 or opts.loader_workers < 0:
        raise SystemExit("vlmc bench: --steps must be >= 1, --warmup, --profile, --loader and --loader_workers >= 0")
    if opts.loader_workers and not opts.loader:
        raise SystemExit("vlmc bench: --loader_workers K needs --loader N (the number of batches to time)")

    args = [a for c in opts.config for a in ("--config", c)] + rest
    profile = OpProfile(opts.warmup + opts.steps, opts.profile) if opts.profile else None
    cli, timer = timed_fit(args, opts.steps, opts.warmup, profile=profile)
    module, trainer = cli.model, cli.trainer
    module.to(trainer.strategy.root_device)  # fit's teardown moved it back to the CPU

    datamodule = cli.datamodule
    batch = datamodule.training_batch(0)
    module.train()
    flops = training_flops(module, batch)
    flops_per_padded_token = flops / batch["attention_mask"].numel()
    step_time = statistics.median(timer.times)
    compute_time = statistics.median(timer.compute_times)
    padded_per_step = statistics.mean(timer.padded_tokens)
    precision = str(trainer.precision)
    peak = peak_flops(module.device, precision)
    achieved = flops_per_padded_token * padded_per_step / step_time
    if opts.plain:
        datamodule._next_position = 0
        plain = plain_loop_step_time(module, datamodule.train_dataloader(), opts.steps, opts.warmup, precision,
                                     clip=cli.trainer.gradient_clip_val)
        # Both sides without data loading: the plain loop times forward, backward and optimizer only.
        results_plain = {"plain_loop_steps_per_s": 1 / plain, "framework_vs_plain_step_time": compute_time / plain}
    else:
        results_plain = {}
    module.eval()
    sample = next(iter(datamodule.val_sets.values()))[0] if datamodule.val_sets else None
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(module.device) if module.device.type == "cuda" else "cpu",
        "precision": precision,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "batch_size": statistics.mean(timer.samples),
        "steps_per_s": 1 / step_time,
        "compute_steps_per_s": 1 / compute_time,
        "tokens_per_s": statistics.mean(timer.tokens) / step_time,
        "padded_tokens_per_s": padded_per_step / step_time,
        "tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "compute_mfu": achieved * step_time / compute_time / peak if peak else None,
        # Every timed step's forward + backward + optimizer time, so runs in separate processes compare step by step.
        "compute_step_ms": [round(1e3 * t, 3) for t in timer.compute_times],
        **results_plain,
    }
    if opts.loader:
        results.update(loader_speed(datamodule, opts.loader, results["steps_per_s"]))
    if opts.loader_workers:
        datamodule._next_position = 0
        results.update(loader_throughput(datamodule, opts.loader_workers, opts.loader))
    if opts.without_plugins:
        results.update(plugin_overhead(args, opts.steps, opts.warmup, timer, [type(p).__name__ for p in
                                                                              find_plugins(trainer)]))
    if sample is not None:
        # Decode in the run's half precision (weights cast, as deployed), not in fp32 master weights.
        half = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else None
        model = copy.deepcopy(module.model).to(half) if half is not None else module.model
        model.eval()
        results["generate_dtype"] = str(model.dtype).replace("torch.", "")
        results["generate_tokens_per_s"] = generation_speed(model, module.processor, sample, opts.new_tokens,
                                                            opts.repeats, False)
        if opts.static_cache:
            results["generate_static_tokens_per_s"] = generation_speed(model, module.processor, sample,
                                                                       opts.new_tokens, opts.repeats, True)
    if profile is not None and profile.result:
        results["profile"] = profile.result
    width = max(len(k) for k in results)
    print("\n".join(f"{k.ljust(width)}  {_fmt(v)}" for k, v in results.items() if k != "profile"))
    if "profile" in results:
        print(format_profile(results["profile"]))
    if opts.out:
        atomic_write_json(Path(opts.out), {**results, "configs": opts.config, "argv": argv})
    return results


def format_profile(profile: dict[str, Any]) -> str:
    """The profile summary as text: the headline shares, then one line per top operator."""
    busy = profile["device_busy_share"]
    lines = [f"profile of {profile['profiled_steps']} steps ({profile['wall_s']:.3f} s wall, {profile['time_basis']}): "
             f"device busy {'-' if busy is None else f'{busy:.0%}'}, matmul share "
             f"{'-' if profile['matmul_share'] is None else format(profile['matmul_share'], '.0%')}"]
    lines += [f"  {row['share']:6.1%}  {row['self_ms']:10.2f} ms  {row['calls']:7d}x  {row['op']}"
              for row in profile["top_ops"]]
    if profile.get("host_top_ops"):
        lines.append(f"host: operators' own CPU time {profile['host_ops_share']:.0%} of the wall time")
        lines += [f"  {row['share_of_wall']:6.1%}  {row['self_ms']:10.2f} ms  {row['calls']:7d}x  {row['op']}"
                  for row in profile["host_top_ops"]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


if __name__ == "__main__":
    import sys

    print(json.dumps(main(sys.argv[1:])))
