"""Training overhead of each compression plugin: mean step time with the plugin / without it, in one process.

Every row runs ``vlmc bench --without_plugins`` on the GPU base config (random weights: step time does not depend
on them) with one plugin configured, so both halves of a ratio share the machine, data and warm-up::

    python experiments/plugin_overhead.py --out experiments/results/sparsity/overhead.json
    python experiments/plugin_overhead.py --smoke      # tiny model on a CPU, checks the wiring
    python experiments/plugin_overhead.py --plugins qat_w4a8 --out overhead_qat.json
    python experiments/plugin_overhead.py --plugins qat_w4a8 --compile    # both halves regionally compiled
    python experiments/plugin_overhead.py --compile --cudagraphs    # and replayed as CUDA graphs
    python experiments/plugin_overhead.py --plugins qat_w4a8 --compile --cudagraphs --static_shapes  # no symbolic sizes
    python experiments/plugin_overhead.py --plugins qat_w4a8 --compile --isolated --rounds 3
        # each half in a fresh process, in alternating order; the ratio is the median over rounds

In one process the half without the plugin runs second, after the first half's model, compile caches and memory;
on a host-bound GPU step the two halves of one row have come out up to 1.3x apart either way. ``--isolated``
removes what the halves share, and the alternating rounds show how much a single ratio can be trusted.

``qat_w4a8`` is the quantization study's QAT W4A8 placement (4-bit per-channel weights, static 8-bit Linear inputs,
per-token KV cache, projector output) with scales learned throughout the timed steps (its costliest phase).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE_MODEL = {"include": "language_model", "exclude": "lm_head"}
PLUGINS: dict[str, dict[str, Any]] = {
    "ramp75_magnitude": {"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "final_sparsity": 0.75, "start": 0.0, "end": 1.0, "update_every": 10, "targets": LANGUAGE_MODEL}},
    "ramp75_activation": {"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "final_sparsity": 0.75, "start": 0.0, "end": 1.0, "update_every": 10, "score": "activation",
        "targets": LANGUAGE_MODEL}},
    "ramp75_activation_every_step": {"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "final_sparsity": 0.75, "start": 0.0, "end": 1.0, "update_every": 10, "score": "activation",
        "stats_steps": None, "targets": LANGUAGE_MODEL}},
    "ramp_2of4": {"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "pattern": "2:4", "start": 0.0, "end": 1.0, "update_every": 10, "targets": LANGUAGE_MODEL}},
    "l0_50_improved": {"class_path": "plugins.l0_pruning.L0Pruning", "init_args": {
        "target_fraction": 0.5, "method": "improved", "multiple_of": 8}},
    "l0_50_plain": {"class_path": "plugins.l0_pruning.L0Pruning", "init_args": {
        "target_fraction": 0.5, "method": "plain", "multiple_of": 8}},
}


def _quantization_rows() -> dict[str, dict[str, Any]]:
    """QAT with the quantization study's placement (loaded from its file: experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vlmc_quantization_study", ROOT / "experiments/quantization_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    # Four calibration batches end inside the warm-up; scales then learn in every timed step.
    qat = {"targets": LANGUAGE_MODEL, "weights": study.weight_spec(4, "ch"), **study.activation_args(8),
           "start_step": 0, "calibration_batches": 4, "freeze_observers_at": None, "scale_lr": 1e-4}
    return {"qat_w4a8": {"class_path": study.QAT, "init_args": qat}}


PLUGINS.update(_quantization_rows())


def row_header(name: str, device: str, opts: argparse.Namespace) -> dict[str, Any]:
    """What a row was measured on: the plugin, the device and the run's settings."""
    return {"plugin": name, "device": device, "batch_size": opts.batch_size, "compiled": opts.compile,
            "cudagraphs": opts.cudagraphs,
            # model.compile_dynamic's 'auto' compiles CUDA-graph runs with static sizes too
            "static_shapes": opts.static_shapes or (opts.compile and opts.cudagraphs)}


def in_one_process(name: str, result: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    """A row from one ``vlmc bench --without_plugins`` (both halves in its process, the plugin's first)."""
    return {**row_header(name, result["device"], opts),
            "step_ms_without": 1e3 * result["step_s_without_plugins"],
            "step_ms_with": 1e3 * result["step_s_with_plugins"],
            "overhead": result["plugin_overhead"], "overhead_median": result["plugin_overhead_median"],
            "step_ms_with_each": result["step_ms_with_plugins"],
            "step_ms_without_each": result["step_ms_without_plugins"]}


def isolated_rounds(name: str, common: list[str], plugin_config: Path, opts: argparse.Namespace,
                    tmp: Path) -> dict[str, Any]:
    """Both halves of one row, each a fresh ``vlmc bench`` process, ``opts.rounds`` times in alternating order."""
    halves: dict[str, list[list[float]]] = {"with": [], "without": []}
    device = ""
    for round_index in range(opts.rounds):
        order = ("with", "without") if round_index % 2 == 0 else ("without", "with")
        for half in order:
            out = tmp / f"{plugin_config.stem}_{half}_{round_index}.json"
            extra = ["--config", str(plugin_config)] if half == "with" else []
            subprocess.run([sys.executable, "-m", "framework.cli", "bench", *common, *extra, "--out", str(out)],
                           cwd=ROOT, check=True)
            result = json.loads(out.read_text())
            halves[half].append(result["compute_step_ms"])
            device = result["device"]
    ratios = [statistics.mean(w) / statistics.mean(wo) for w, wo in zip(halves["with"], halves["without"])]
    # The same per round on median steps: one stalled step (a host hiccup of 10x the step) moves a round's mean ratio
    # by several percent and its median ratio by nothing.
    median_ratios = [statistics.median(w) / statistics.median(wo) for w, wo in zip(halves["with"], halves["without"])]
    steps_with = [t for steps in halves["with"] for t in steps]
    steps_without = [t for steps in halves["without"] for t in steps]
    return {**row_header(name, device, opts),
            "step_ms_without": statistics.mean(steps_without), "step_ms_with": statistics.mean(steps_with),
            "overhead": statistics.median(ratios),
            "overhead_median": statistics.median(steps_with) / statistics.median(steps_without),
            "overhead_rounds": ratios, "overhead_rounds_median": median_ratios, "isolated": True,
            "step_ms_with_each": steps_with, "step_ms_without_each": steps_without}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", nargs="+", default=list(PLUGINS), choices=list(PLUGINS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compile", action="store_true",
                        help="both halves with regional torch.compile (model.compile: each transformer block, with the "
                             "plugin's quantizers, masks and hooks inside it)")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="with --compile: CUDA graphs (compile_mode=reduce-overhead, every batch padded to "
                             "max_length), as the CUDA-graph recipes train")
    parser.add_argument("--static_shapes", action="store_true",
                        help="with --compile: model.compile_dynamic=false (no symbolic sizes). Without it the model's "
                             "'auto' applies: static sizes with --cudagraphs (padded steps never change shape), "
                             "symbolic ones without")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="data workers (default: the config's); fewer leave the host's cores to the training loop")
    parser.add_argument("--isolated", action="store_true",
                        help="time each half in its own `vlmc bench` process (nothing shared between them)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --isolated: repeat both halves, with-first and without-first in turn; the row's "
                             "overhead is the median of the rounds' mean-step ratios")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    opts = parser.parse_args(argv)

    from framework.bench import main as bench

    common = ["--config", str(ROOT / "experiments/pretrain/gpu_base.yaml"),
              "--config", str(ROOT / "experiments/csv_logger.yaml"), f"--data.init_args.batch_size={opts.batch_size}",
              "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--new_tokens", "2", "--repeats", "1"]
    if opts.rounds < 1 or (opts.rounds > 1 and not opts.isolated):
        parser.error("--rounds must be >= 1, and above 1 only with --isolated")
    if not opts.isolated:
        common.append("--without_plugins")
    if opts.compile:
        common.append("--model.init_args.compile=true")
    if opts.cudagraphs:
        if not opts.compile:
            parser.error("--cudagraphs needs --compile")
        common += ["--model.init_args.compile_mode=reduce-overhead", "--data.init_args.pad_to_max_length=true"]
    if opts.static_shapes:
        if not opts.compile:
            parser.error("--static_shapes needs --compile")
        common.append("--model.init_args.compile_dynamic=false")
    if opts.num_workers is not None:
        common.append(f"--data.init_args.num_workers={opts.num_workers}")
    if opts.smoke:
        common += ["--model.init_args.model=experiments/models/llava-test.json", "--trainer.accelerator=cpu",
                   "--trainer.precision=32-true", "--data.init_args.image_size=64", "--data.init_args.num_workers=0",
                   "--data.init_args.val_samples=4", "--data.init_args.max_length=128"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.plugins:
            config = Path(tmp) / f"{name}.yaml"
            config.write_text(yaml.safe_dump({"trainer": {"callbacks": [PLUGINS[name]]}}))
            if opts.isolated:
                rows.append(isolated_rounds(name, common, config, opts, Path(tmp)))
            else:
                rows.append(in_one_process(name, bench(common + ["--config", str(config)]), opts))
            if opts.out:  # after every row: a run cut short keeps what it measured
                from framework.io import atomic_write_json

                atomic_write_json(Path(opts.out), {"rows": rows, "argv": sys.argv[1:] if argv is None else argv})
    columns = [c for c in rows[0] if not c.endswith("_each")]
    print("  ".join(columns))
    for row in rows:
        print("  ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return rows


if __name__ == "__main__":
    main()
