"""Check finished mixed-precision plans on batches none of their choices saw.

Plans are chosen (and refined) on a few calibration batches, and a small validation set cannot tell apart plans
whose top-1 agreement differs by a tenth of a point (a few tokens). This measures each plan, and uniform widths
beside it, with every layer at its width at once (:class:`~plugins.quantization.sensitivity.JointMeasure`) on
training batches drawn after the ones the plans were made on. With the ``disagreement`` metric it also pairs each
plan with each uniform width token by token: the tokens only the plan gets wrong against those only the uniform
width gets wrong (a sign test's discordant pairs), so a difference can be told from noise.

Weights are quantized with the config's weight spec and activations stay float (``--activations float``, the
default), or, with ``--activations config``, the activations are quantized as the config's quantization plugin
places them (its ``activations``, ``activation_points``, ``activation_sites`` and ``shared_inputs``: the W?A8 a
plan is validated as) and calibrated for each plan's weights as PTQ calibrates them
(:meth:`~plugins.quantization.PostTrainingQuantization.recalibrate`: static ranges observed on the first
``calibration_batches`` training batches with the plan's weights quantized). Give the config that validates the
plans, e.g. the study's ``sensitivity.yaml`` (a PTQ with the plans' weight spec and the validated activations).

    python -m plugins.quantization.plan_check --config experiments/quickstart.yaml --config <sensitivity config> \\
        --model.init_args.model=<export> --plans plans/plan_avg3.json plans/plan_avg4.json --uniform 3 4 \\
        --skip 48 --batches 64 [--activations config] --out plan_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch

from framework.io import atomic_write_json
from plugins.quantization.common import QuantizedModules
from plugins.quantization.config import BITS
from plugins.quantization.ptq import PostTrainingQuantization
from plugins.quantization.sensitivity import JOINT_METRICS, JointMeasure, calibration_batches, load_plan

#: ``--activations``: float, or quantized as the config's quantization plugin places them.
ACTIVATIONS = ("float", "config")


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact sign-test p-value for ``only_a`` against ``only_b`` discordant pairs (1.0 when none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def check_plans(measure: JointMeasure, plans: dict[str, dict[str, int]], uniform: list[int]) -> dict[str, Any]:
    """Each plan's and uniform width's measure on ``measure``'s batches (inside its ``with`` block); for the
    ``disagreement`` metric also the token-by-token comparison of every plan with every uniform width."""
    layers = list(measure.layers)
    candidates = {**plans, **{f"uniform_{bits}": dict.fromkeys(layers, bits) for bits in uniform}}
    rows: dict[str, dict[str, Any]] = {}
    wrong: dict[str, torch.Tensor] = {}
    for name, plan in candidates.items():
        if measure.metric == "disagreement":
            wrong[name] = measure.disagreeing_tokens(plan)
            rows[name] = {"disagreement": float(wrong[name].float().mean()),
                          "disagreeing_tokens": int(wrong[name].sum())}
        else:
            rows[name] = {measure.metric: measure(plan)}
    pairs = []
    for plan_name in plans:
        for bits in uniform if wrong else []:
            a, b = wrong[plan_name], wrong[f"uniform_{bits}"]
            only_plan, only_uniform = int((a & ~b).sum()), int((b & ~a).sum())
            pairs.append({"plan": plan_name, "uniform": bits, "only_plan_wrong": only_plan,
                          "only_uniform_wrong": only_uniform, "sign_test_p": sign_test_p(only_plan, only_uniform)})
    return {"metric": measure.metric, "scored_tokens": measure.count, "batches": len(measure.batches),
            "rows": rows, "pairs": pairs}


def activation_quantizers(plugins: list[Any]) -> PostTrainingQuantization:
    """The activation quantizers of the run's quantization plugin, as a PTQ without weight quantizers (the plans'
    weights are written by :class:`~plugins.quantization.sensitivity.JointMeasure`): the same targets, activation
    spec, points, sites, shared inputs and calibration batches (at least 1). A QAT config gives the encodings its
    calibration starts from (learning then moves them); a PTQ config the ones it validates with.

    Raises:
        SystemExit: naming ``--activations``: no quantization plugin in the config, several, or one that quantizes
            no activations.
    """
    found = [p for p in plugins if isinstance(p, QuantizedModules)]
    if not found:
        raise SystemExit("--activations config: the config has no quantization plugin (QAT / PTQ) to take the "
                         "activation quantizers from; add the config that validates the plans")
    if len(found) > 1:
        raise SystemExit(f"--activations config: the config has {len(found)} quantization plugins "
                         f"({', '.join(p.name for p in found)}); give the one that validates the plans")
    plugin = found[0]
    if plugin.activations is None and not plugin.activation_sites:
        raise SystemExit(f"--activations config: {type(plugin).__name__} ({plugin.name}) quantizes no activations; "
                         "give the config that validates the plans (its activations / activation_sites), or "
                         "--activations float")
    return PostTrainingQuantization(
        weights=None, activations=plugin.activations, targets=plugin.targets,
        activation_points=plugin.activation_points, activation_sites=plugin.activation_sites,
        calibration_batches=max(1, int(getattr(plugin, "calibration_batches", 1))), runtime=plugin.runtime,
        name=plugin.name, shared_inputs=plugin.shared_inputs)


def describe_activations(ptq: PostTrainingQuantization | None, model: torch.nn.Module) -> str | dict[str, Any]:
    """``"float"``, or how the activations were quantized (for the result JSON)."""
    if ptq is None:
        return "float"
    summary = ptq.summary(model)
    return {"spec": None if ptq.activations is None else ptq.activations.to_dict(),
            "points": ptq.activation_points,
            "sites": [{"targets": dataclasses.asdict(site.targets), "points": site.points,
                       "spec": None if site.spec is None else site.spec.to_dict()} for site in ptq.activation_sites],
            "shared_inputs": ptq.shared_inputs, "quantizers": summary["activation_quantizers"],
            "calibration_batches": ptq.calibration_batches}


def format_check(result: dict[str, Any]) -> str:
    metric = result["metric"]
    activations = result.get("activations", "float")
    quantized = "float" if activations == "float" else (
        f"{activations['quantizers']} activation quantizers of the config, calibrated per plan on "
        f"{activations['calibration_batches']} training batches as PTQ calibrates them")
    head = (f"{result['batches']} batches, {result['scored_tokens']} scored tokens, metric {metric}, "
            f"activations {quantized}")
    lines = [head,
             f"{'plan':<28} {metric:>13}" + ("  disagreeing tokens" if metric == "disagreement" else "")]
    for name, row in result["rows"].items():
        extra = f"  {row['disagreeing_tokens']:>18}" if "disagreeing_tokens" in row else ""
        lines.append(f"{name:<28} {row[metric]:>13.5g}{extra}")
    for pair in result["pairs"]:
        lines.append(f"{pair['plan']} vs uniform {pair['uniform']} bits: only the plan wrong on "
                     f"{pair['only_plan_wrong']} tokens, only uniform on {pair['only_uniform_wrong']} "
                     f"(sign test p = {pair['sign_test_p']:.3g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m plugins.quantization.plan_check``: measure plans and uniform widths on fresh batches."""
    parser = argparse.ArgumentParser(prog="python -m plugins.quantization.plan_check",
                                     description="Measure mixed-precision plans on batches they were not made on.",
                                     allow_abbrev=False)  # other options go to the run's config parser
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--plans", nargs="+", required=True, help="plan JSON files (one layer set)")
    parser.add_argument("--uniform", type=int, nargs="*", default=[], help="uniform widths measured beside them")
    parser.add_argument("--skip", type=int, default=0,
                        help="training batches to skip first: those the plans' table and refining used")
    parser.add_argument("--batches", type=int, default=64, help="training batches to measure on")
    parser.add_argument("--metric", choices=JOINT_METRICS, default="disagreement")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="float",
                        help="float, or quantized as the config's quantization plugin places them (W?A8 as validated), "
                             "calibrated for each plan as PTQ calibrates them")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (written atomically)")
    opts, rest = parser.parse_known_args(argv)
    if opts.skip < 0 or opts.batches < 1:
        raise SystemExit("--skip: must be >= 0; --batches: must be >= 1")
    low, high = BITS["weights"]
    if any(not low <= bits <= high for bits in opts.uniform):
        raise SystemExit(f"--uniform: widths must be in [{low}, {high}], got {opts.uniform}")
    stems = [Path(path).stem for path in opts.plans]
    # Plans of several studies share file names: those are told apart by their folder.
    names = [stem if stems.count(stem) == 1 else f"{Path(path).parent.name}/{stem}"
             for stem, path in zip(stems, opts.plans)]
    if len(set(names)) != len(names):
        raise SystemExit(f"--plans: give each plan once (got {opts.plans})")
    plans = {name: load_plan(path, key="--plans") for name, path in zip(names, opts.plans)}
    layer_sets = {name: frozenset(plan) for name, plan in plans.items()}
    first = next(iter(layer_sets.values()))
    for name, layers in layer_sets.items():
        if layers != first:
            raise SystemExit(f"--plans: {name} plans other layers than {next(iter(plans))} "
                             f"({len(layers ^ first)} differ); check plans of one model and selection together")
    from framework.cli import build
    from framework.plugin import find_plugins
    from plugins.quantization.sensitivity import _plugin_choice

    cli = build([a for c in opts.config for a in ("--config", c)] + rest, run=False)
    plugins = find_plugins(cli.trainer)
    _, template = _plugin_choice(plugins)
    ptq = activation_quantizers(plugins) if opts.activations == "config" else None
    batches = calibration_batches(cli, opts.batches, start=opts.skip)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cli.model.to(device)
    model = cli.model.model
    calibrate = None
    if ptq is not None:
        ptq.transform(model)  # activation quantizers only, off until calibrated
        calibration = calibration_batches(cli, ptq.calibration_batches)  # what PTQ observes: batches 0..n-1

        def calibrate() -> None:
            ptq.recalibrate(model, calibration)

    with cli.trainer.precision_plugin.forward_context(), \
            JointMeasure(model, batches, sorted(first), template, opts.metric,
                         calibrate_activations=calibrate) as measure:
        result = check_plans(measure, plans, opts.uniform)
    result.update(skip=opts.skip, activations=describe_activations(ptq, model),
                  plans={name: str(path) for name, path in zip(plans, opts.plans)})
    print(format_check(result))
    if opts.out:
        atomic_write_json(opts.out, result)
        print(f"written to {opts.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
