"""Sensitivity-based mixed precision: how much each layer's weight quantization hurts, then bits per layer.

Each selected Linear layer's weight alone is quantized at each candidate width (everything else float) and the
change of the loss, or the KL divergence of the logits from the float model's, is measured on a few calibration
batches: a measured stand-in for HAWQ's Hessian-based sensitivity (Dong et al. 2019). With ``context_bits`` the
other selected layers are quantized at that width meanwhile, so a layer is judged inside a quantized model, where
the errors of many low-bit layers add up (measured alone, each looked harmless on the GPU base). An exact
multiple-choice knapsack then picks the widths with the least summed sensitivity under a parameter-weighted
average-bits (or bytes) budget; QAT and PTQ read the resulting plan JSON through their ``plan:`` argument.

Command line::

    python -m plugins.quantization.sensitivity --config experiments/quantization/mixed_avg4.yaml \\
        --budget_avg_bits 4 --bits 2 3 4 8 --batches 4 --out experiments/results/quantization/plan_avg4.json

Several budgets share one measurement: ``--budget_avg_bits 3 4 5 --out plans/plan_avg{budget}.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from typing_extensions import Self

from framework.io import atomic_write_json
from framework.module import model_inputs
from framework.selection import ModuleSelection
from plugins.quantization.config import BITS, QuantSpec, check_spec
from plugins.quantization.placement import WEIGHT, quantization_disabled
from plugins.quantization.quantizer import FakeQuantizer

METRICS = ("loss", "kl")
#: What a whole plan can be measured by (:class:`JointMeasure`): the sensitivity metrics, or top-1 disagreement.
JOINT_METRICS = (*METRICS, "disagreement")
DEFAULT_BITS = (2, 3, 4, 8)
#: Largest number of budget states of the dynamic programme (fewer for many layers, so its choice table stays
#: near 20M entries); beyond it costs are rounded up (plans stay within the budget).
MAX_STATES = 200_000


# ---------------------------------------------------------------------------------------------- measuring
def _check_bits(bits_options: Iterable[int], key: str = "bits_options") -> list[int]:
    options = sorted(set(bits_options))
    low, high = BITS["weights"]
    if not options or any(isinstance(b, bool) or not isinstance(b, int) or not low <= b <= high for b in options):
        raise ValueError(f"{key}: must be a non-empty list of integers in [{low}, {high}], got {list(bits_options)!r}")
    return options


def _select_layers(model: nn.Module, layers: ModuleSelection | Sequence[str]) -> dict[str, nn.Linear]:
    if isinstance(layers, ModuleSelection):
        chosen = layers.select(model, owner="layers")
    else:
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"layers: {missing[0]} is not a module of the model")
        chosen = {name: modules[name] for name in layers}
    if not chosen:
        raise ValueError("layers: no layer selected")
    for name, module in chosen.items():
        if not isinstance(module, nn.Linear):
            raise ValueError(f"layers: {name} is a {type(module).__name__}; sensitivity is measured on Linear weights")
    return chosen


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _token_mask(batch: Mapping[str, Any], metric: str) -> torch.Tensor:
    """Positions whose next-token prediction is scored: answer tokens (labels), else every attended token."""
    if "labels" in batch:
        return batch["labels"][:, 1:] != -100
    if metric == "loss":
        raise ValueError("metric: 'loss' needs batches with 'labels'; use metric 'kl' for unlabelled batches")
    if "attention_mask" in batch:
        return batch["attention_mask"][:, 1:].bool()
    return torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)


def _scored_logits(model: nn.Module, batch: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[scored tokens, vocab]`` that predict the tokens under ``mask``."""
    out = model(**model_inputs(batch, labels=False))
    return out.logits[:, :-1][mask].float()


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` on the grid of ``spec`` with round-to-nearest qparams from the weight itself (as QAT starts)."""
    quantizer = FakeQuantizer(spec, tuple(weight.shape)).to(weight.device)
    quantizer.calibrate(weight.detach())
    return quantizer.fake_quant(weight.detach())


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    layers: ModuleSelection | Sequence[str],
    bits_options: Sequence[int] = DEFAULT_BITS,
    spec_template: QuantSpec | None = None,
    metric: str = "loss",
    context_bits: int | None = None,
) -> list[dict[str, Any]]:
    """How much quantizing each layer's weight alone changes the model's output.

    For each layer and bit width the layer's weight is replaced by its quantized value (``spec_template`` with
    ``bits`` set; qparams from the weight), every other tensor stays float (quantizers already attached to the
    model are switched off meanwhile), the model runs on ``batches`` in eval mode, and the weight is restored
    exactly. The float outputs are computed once.

    Args:
        model: an HF model whose forward takes the batch tensors and returns ``logits``.
        batches: calibration batches (dicts of ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``,
            ...); moved to the model's device.
        layers: a :class:`~framework.selection.ModuleSelection` or qualified names of Linear layers.
        bits_options: candidate weight widths, each in [2, 8].
        spec_template: how weights are quantized apart from ``bits``; default per-channel symmetric min/max.
        metric: ``loss`` (change of the mean cross-entropy on answer tokens, labels needed) or ``kl``
            (mean KL divergence of the quantized model's next-token distribution from the float one's).
        context_bits: quantize every other selected layer at this width (in [2, 8]) while one is measured;
            ``None``: the others stay float. Each delta is then the whole quantized model's, against the float
            model: within a layer's row the widths compare as before, and every row at ``context_bits`` holds the
            same value (the model quantized uniformly at that width).

    Returns:
        One row per layer and width, ``{"layer", "params", "bits", "delta"}``, layer-major, widths ascending.

    Raises:
        ValueError: naming the argument: an unknown metric, bad widths, no batches, a layer that is not a Linear,
            or a spec that does not fit a layer (e.g. a group size that does not divide its inputs).
    """
    if metric not in METRICS:
        raise ValueError(f"metric: must be one of {', '.join(repr(m) for m in METRICS)}, got {metric!r}")
    options = _check_bits(bits_options)
    if context_bits is not None:
        _check_bits([context_bits], "context_bits")
    template = spec_template or QuantSpec(bits=8, granularity="channel")
    check_spec(template, "weights", "spec_template")
    if not batches:
        raise ValueError("batches: give at least one calibration batch")
    chosen = _select_layers(model, layers)
    device = next(model.parameters()).device
    batches = [_to_device(b, device) for b in batches]
    masks = [_token_mask(b, metric) for b in batches]
    counts = [int(m.sum()) for m in masks]
    if sum(counts) == 0:
        raise ValueError("batches: no scored token (every label is -100)")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    rows: list[dict[str, Any]] = []
    originals = {name: layer.weight.detach().clone() for name, layer in chosen.items()}

    def quantized(name: str, bits: int) -> torch.Tensor:
        try:
            return quantize_weight(originals[name], dataclasses.replace(template, bits=bits))
        except ValueError as err:
            raise ValueError(f"spec_template: does not fit {name} ({err})") from err

    try:
        with quantization_disabled(model):
            reference = [_scored_logits(model, b, m) for b, m in zip(batches, masks)]
            targets = [b["labels"][:, 1:][m] if metric == "loss" else None for b, m in zip(batches, masks)]
            ref_log_probs = [F.log_softmax(r, dim=-1) for r in reference] if metric == "kl" else None
            ref_loss = (sum(float(F.cross_entropy(r, t, reduction="sum")) for r, t in zip(reference, targets))
                        / sum(counts)) if metric == "loss" else 0.0
            del reference
            context = {name: quantized(name, context_bits) for name in chosen} if context_bits is not None else {}
            for name, layer in chosen.items():
                layer.weight.copy_(context.get(name, originals[name]))
            for name, layer in chosen.items():
                for bits in options:
                    layer.weight.copy_(quantized(name, bits))
                    total = 0.0
                    for index, (batch, mask) in enumerate(zip(batches, masks)):
                        logits = _scored_logits(model, batch, mask)
                        if metric == "loss":
                            total += float(F.cross_entropy(logits, targets[index], reduction="sum"))
                        else:
                            log_probs = F.log_softmax(logits, dim=-1)
                            total += float(F.kl_div(log_probs, ref_log_probs[index], log_target=True,
                                                    reduction="sum"))
                    delta = total / sum(counts) - ref_loss
                    rows.append({"layer": name, "params": layer.weight.numel(), "bits": bits, "delta": delta})
                layer.weight.copy_(context.get(name, originals[name]))
    finally:
        for name, layer in chosen.items():
            layer.weight.copy_(originals[name])
        for module, mode in modes.items():
            module.training = mode
    return rows


# ---------------------------------------------------------------------------------------------- planning
def _table(rows: Sequence[Mapping[str, Any]], bits_options: Sequence[int], monotone: bool = True
           ) -> tuple[list[str], list[int], np.ndarray]:
    """Layers, their sizes and a ``[layers, options]`` matrix of deltas (rows for every option required).

    With ``monotone`` a layer's delta at a width is at least its delta at every larger width and at least 0."""
    options = list(bits_options)
    layers: dict[str, int] = {}
    deltas: dict[tuple[str, int], float] = {}
    for index, row in enumerate(rows):
        for field in ("layer", "params", "bits", "delta"):
            if field not in row:
                raise ValueError(f"rows[{index}]: missing {field!r}")
        name, params = str(row["layer"]), int(row["params"])
        if params < 1:
            raise ValueError(f"rows[{index}].params: must be >= 1, got {params}")
        if layers.setdefault(name, params) != params:
            raise ValueError(f"rows[{index}].params: {name} has {params} parameters here and {layers[name]} before")
        delta = float(row["delta"])
        if not math.isfinite(delta):
            raise ValueError(f"rows[{index}].delta: {name} at {row['bits']} bits is {delta}; not a finite number")
        deltas[(name, int(row["bits"]))] = delta
    if not layers:
        raise ValueError("rows: empty sensitivity table")
    names = list(layers)
    for name in names:
        for bits in options:
            if (name, bits) not in deltas:
                raise ValueError(f"rows: no sensitivity of {name} at {bits} bits (bits_options {options})")
    matrix = np.array([[deltas[(n, b)] for b in options] for n in names], dtype=np.float64)
    if monotone:
        matrix = np.maximum.accumulate(np.maximum(matrix, 0.0)[:, ::-1], axis=1)[:, ::-1]
    return names, [layers[n] for n in names], matrix


def _knapsack(costs: np.ndarray, values: np.ndarray, capacity: int) -> list[int] | None:
    """Multiple-choice knapsack: one option per row with ``sum(cost) <= capacity`` and least ``sum(value)``.

    Exact dynamic programme over integer costs ``[rows, options]``; ``None`` when nothing fits.
    """
    best = np.zeros(capacity + 1)  # best[c]: least value of the rows so far with total cost <= c
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int8)
    for row in range(len(costs)):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int8)
        for option in range(costs.shape[1] - 1, -1, -1):  # widest first: on a tie the wider option stays
            cost, value = costs[row, option], values[row, option]
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[: capacity + 1 - cost] + value
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = option
        best, choices[row] = new, pick
    if not math.isfinite(best[capacity]):
        return None
    plan, remaining = [], capacity
    for row in range(len(costs) - 1, -1, -1):
        option = int(choices[row, remaining])
        plan.append(option)
        remaining -= int(costs[row, option])
    return plan[::-1]


def plan_bits(
    rows: Sequence[Mapping[str, Any]],
    budget_avg_bits: float | None = None,
    budget_bytes: int | None = None,
    bits_options: Sequence[int] = DEFAULT_BITS,
    monotone: bool = True,
) -> dict[str, Any]:
    """A width per layer with the least summed sensitivity under a budget.

    The budget is on the quantized weights of the layers in ``rows``: their parameter-weighted average bits
    (``budget_avg_bits``) or the bytes of their integer codes (``budget_bytes``; scales and offsets not counted).
    Costs are ``params * bits``, made integer by their greatest common divisor, and the multiple-choice knapsack
    is solved exactly; when that would need more than :data:`MAX_STATES` budget states, costs are rounded up to
    a coarser unit, which keeps every plan within the budget but may miss the optimum by a little (``"exact":
    false`` in the result).

    Args:
        rows: the sensitivity table of :func:`measure_sensitivity` (``layer``, ``params``, ``bits``, ``delta``).
        budget_avg_bits: largest parameter-weighted average width.
        budget_bytes: largest size of the codes in bytes (give one of the two budgets).
        bits_options: widths to choose from; every layer needs a row for each.
        monotone: plan on each layer's monotone envelope: its delta at a width is raised to its largest delta at
            any wider option and to at least 0, so measurement noise (or a model away from its loss minimum)
            never makes fewer bits look better; ``predicted_delta`` is summed on the same values.

    Returns:
        ``{"budget", "avg_bits", "total_bits", "predicted_delta", "exact", "bits_options", "layers": {layer: bits},
        "sensitivity": rows}``.

    Raises:
        ValueError: naming the key: both or neither budget, a budget no plan can meet (below every layer at the
            smallest width), bad widths, or an incomplete table.
    """
    options = _check_bits(bits_options)
    if (budget_avg_bits is None) == (budget_bytes is None):
        raise ValueError("budget_avg_bits / budget_bytes: give exactly one of the two budgets")
    names, params, deltas = _table(rows, options, monotone)
    total_params = sum(params)
    if budget_avg_bits is not None:
        if not (isinstance(budget_avg_bits, (int, float)) and math.isfinite(budget_avg_bits)):
            raise ValueError(f"budget_avg_bits: must be a number, got {budget_avg_bits!r}")
        key, budget = "budget_avg_bits", {"avg_bits": float(budget_avg_bits)}
        limit = float(budget_avg_bits) * total_params
        limit = math.floor(limit + 1e-9 * max(1.0, limit))  # an average like 4.0 is met exactly
    else:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise ValueError(f"budget_bytes: must be an integer, got {budget_bytes!r}")
        key, budget, limit = "budget_bytes", {"bytes": budget_bytes}, 8 * budget_bytes
    smallest = options[0] * total_params
    if limit < smallest:
        raise ValueError(f"{key}: {next(iter(budget.values()))} cannot be met: every layer at the smallest width "
                         f"({options[0]} bits) already takes {smallest} bits ({smallest / total_params:.4g} average, "
                         f"{math.ceil(smallest / 8)} bytes)")
    costs = np.array([[p * b for b in options] for p in params], dtype=np.int64)
    unit = int(np.gcd.reduce(costs.reshape(-1)))
    limit = min(limit, int(costs.max(axis=1).sum()))  # more budget than all-largest buys nothing
    max_states = max(2_000, min(MAX_STATES, 20_000_000 // len(names)))
    exact = limit // unit <= max_states
    if not exact:
        unit = math.ceil(limit / max_states)
    scaled = -(-costs // unit)  # rounded up: a plan that fits the scaled budget fits the real one
    choice = _knapsack(scaled, deltas, limit // unit)
    if choice is None:  # only possible after rounding up; the all-smallest plan always fits the real budget
        choice = [0] * len(names)
    bits = {name: options[c] for name, c in zip(names, choice)}
    total_bits = sum(p * bits[n] for n, p in zip(names, params))
    return {
        "budget": budget,
        "avg_bits": total_bits / total_params,
        "total_bits": total_bits,
        "predicted_delta": float(sum(deltas[i, c] for i, c in enumerate(choice))),
        "exact": bool(exact),
        "monotone": bool(monotone),
        "bits_options": options,
        "layers": bits,
        "sensitivity": [dict(r) for r in rows],
    }


def uniform_delta(rows: Sequence[Mapping[str, Any]], bits: int, bits_options: Sequence[int] | None = None,
                  monotone: bool = True) -> float:
    """Summed predicted sensitivity of every layer at ``bits`` (the uniform baseline a plan is compared to), on
    the values :func:`plan_bits` plans with for ``bits_options`` (default: just ``bits``)."""
    options = _check_bits(bits_options or [bits])
    if bits not in options:
        raise ValueError(f"bits: {bits} is not among bits_options {options}")
    _, _, deltas = _table(rows, options, monotone)
    return float(deltas[:, options.index(bits)].sum())


def pareto_curve(rows: Sequence[Mapping[str, Any]], budgets: Sequence[float],
                 bits_options: Sequence[int] = DEFAULT_BITS) -> list[dict[str, Any]]:
    """For each average-bits budget, the plan's achieved average and summed predicted delta (``None`` when the
    budget cannot be met)."""
    curve = []
    for budget in budgets:
        try:
            plan = plan_bits(rows, budget_avg_bits=budget, bits_options=bits_options)
        except ValueError:
            curve.append({"budget_avg_bits": budget, "avg_bits": None, "predicted_delta": None})
            continue
        curve.append({"budget_avg_bits": budget, "avg_bits": plan["avg_bits"],
                      "predicted_delta": plan["predicted_delta"]})
    return curve


# ---------------------------------------------------------------------------------------------- refining
class JointMeasure:
    """The output change of the model with every layer of a plan quantized at once, against the float model.

    The knapsack adds single-layer sensitivities; errors of many low-bit layers do not add up that simply (on the
    GPU base plans that looked better layer by layer lost to uniform widths). This measures a whole plan on the
    calibration batches: the KL divergence or loss change of :func:`measure_sensitivity`, or ``disagreement``, the
    share of scored tokens whose top-1 prediction differs from the float model's (one minus the top-1 agreement the
    talk's table reports). Quantized weights are computed once per (layer, width) and kept (memory grows to one copy
    of the layers per width tried), and only the layers whose width changed are rewritten between two plans.

    ``held_out``: the last this many batches are kept apart; ``measure(plan)`` reads the others and
    ``measure(plan, held_out=True)`` these, so a search over plans can check its choices on batches it did not pick
    them on.

    Activations are float unless ``calibrate_activations`` is given: then the model carries activation quantizers
    (and no weight quantizer on a measured layer: the weights are quantized here), and the function calibrates them
    for the weights the model holds and switches them on, e.g. ``lambda: ptq.recalibrate(model, calibration)`` of a
    :class:`~plugins.quantization.PostTrainingQuantization` without weights. It is called whenever a plan with other
    widths than the last one is written, so each plan is measured with the activation encodings PTQ would calibrate
    for it (W?A8 as validated); the float reference runs with every quantizer off.

    Use as a context manager: the weights are restored exactly, and train/eval modes and quantizer switches reset on
    exit.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Mapping[str, Any]], layers: Sequence[str],
                 spec_template: QuantSpec | None = None, metric: str = "kl", held_out: int = 0,
                 calibrate_activations: Callable[[], None] | None = None) -> None:
        if metric not in JOINT_METRICS:
            raise ValueError(f"metric: must be one of {', '.join(repr(m) for m in JOINT_METRICS)}, got {metric!r}")
        if not batches:
            raise ValueError("batches: give at least one calibration batch")
        if not 0 <= held_out < len(batches):
            raise ValueError(f"held_out: must be in [0, {len(batches) - 1}] for {len(batches)} batches, got {held_out}")
        self.model, self.metric = model, metric
        self.template = spec_template or QuantSpec(bits=8, granularity="channel")
        self.layers = _select_layers(model, list(layers))
        if calibrate_activations is not None:
            quantized = [name for name, layer in self.layers.items() if isinstance(getattr(layer, WEIGHT, None),
                                                                                  FakeQuantizer)]
            if quantized:
                raise ValueError(f"calibrate_activations: {quantized[0]} has a weight quantizer; plans write their "
                                 "quantized weights themselves, so attach activation quantizers only (weights: null)")
        self.calibrate_activations = calibrate_activations
        device = next(model.parameters()).device
        self.batches = [_to_device(b, device) for b in batches]
        self.masks = [_token_mask(b, metric) for b in self.batches]
        self._counts = [int(m.sum()) for m in self.masks]
        self.count = sum(self._counts)
        if self.count == 0:
            raise ValueError("batches: no scored token (every label is -100)")
        self.held_out = held_out
        split = len(self.batches) - held_out
        self._subsets = {False: list(range(split)), True: list(range(split, len(self.batches)))}
        for kept_apart, indices in self._subsets.items():
            if indices and sum(self._counts[i] for i in indices) == 0:
                raise ValueError(f"batches: the {'held-out' if kept_apart else 'searched'} batches score no token")
        self.originals = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._current: dict[str, int] = {}
        self.evaluations = 0

    def __enter__(self) -> Self:
        self._modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        self._disabled = quantization_disabled(self.model)
        self._disabled.__enter__()
        with torch.no_grad():
            reference = [_scored_logits(self.model, b, m) for b, m in zip(self.batches, self.masks)]
        if self.metric == "loss":  # per batch: the float model's summed loss
            self._targets = [b["labels"][:, 1:][m] for b, m in zip(self.batches, self.masks)]
            self._reference = [float(F.cross_entropy(r, t, reduction="sum")) for r, t in zip(reference, self._targets)]
        elif self.metric == "disagreement":
            self._reference = [r.argmax(dim=-1) for r in reference]
        else:
            self._reference = [F.log_softmax(r, dim=-1) for r in reference]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.weight.copy_(self.originals[name])
        self._current = {}
        del self._reference
        self._disabled.__exit__(*exc)
        for module, mode in self._modes.items():
            module.training = mode

    def _weight(self, name: str, bits: int) -> torch.Tensor:
        if (name, bits) not in self._cache:
            try:
                self._cache[(name, bits)] = quantize_weight(self.originals[name],
                                                            dataclasses.replace(self.template, bits=bits))
            except ValueError as err:
                raise ValueError(f"spec_template: does not fit {name} ({err})") from err
        return self._cache[(name, bits)]

    @torch.no_grad()
    def __call__(self, plan: Mapping[str, int], held_out: bool = False) -> float:
        """Mean KL, loss change or top-1 disagreement per scored token with each layer of ``plan`` at its width, on
        the searched batches (or the held-out ones)."""
        self._apply(plan)
        indices = self._subsets[bool(held_out)]
        if not indices:
            raise ValueError("held_out: this JointMeasure keeps no batch apart (held_out=0)")
        total = 0.0
        for index in indices:
            logits = _scored_logits(self.model, self.batches[index], self.masks[index])
            if self.metric == "loss":
                total += float(F.cross_entropy(logits, self._targets[index], reduction="sum")) - self._reference[index]
            elif self.metric == "disagreement":
                total += float((logits.argmax(dim=-1) != self._reference[index]).sum())
            else:
                total += float(F.kl_div(F.log_softmax(logits, dim=-1), self._reference[index], log_target=True,
                                        reduction="sum"))
        self.evaluations += 1
        return total / sum(self._counts[i] for i in indices)

    @torch.no_grad()
    def disagreeing_tokens(self, plan: Mapping[str, int]) -> torch.Tensor:
        """For every scored token of every batch (searched, then held out), whether ``plan``'s top-1 prediction
        differs from the float model's: two plans' vectors pair token by token (metric ``disagreement`` only)."""
        if self.metric != "disagreement":
            raise ValueError(f"disagreeing_tokens: needs metric 'disagreement', this JointMeasure has {self.metric!r}")
        self._apply(plan)
        self.evaluations += 1
        return torch.cat([(_scored_logits(self.model, b, m).argmax(dim=-1) != r).cpu()
                          for b, m, r in zip(self.batches, self.masks, self._reference)])

    def _apply(self, plan: Mapping[str, int]) -> None:
        if not hasattr(self, "_reference"):
            raise RuntimeError("JointMeasure: measure plans inside `with JointMeasure(...) as measure:`")
        missing = [name for name in self.layers if name not in plan]
        if missing:
            raise ValueError(f"plan: layer {missing[0]} has no width")
        changed = False
        for name, bits in plan.items():
            if self._current.get(name) != bits:
                self.layers[name].weight.copy_(self._weight(name, int(bits)))
                self._current[name] = int(bits)
                changed = True
        if changed and self.calibrate_activations is not None:
            self.calibrate_activations()  # encodings for these weights, as PTQ calibrates them


def refine_plan(plan: Mapping[str, Any], measure: JointMeasure, max_evaluations: int = 40,
                moves_per_round: int = 4) -> dict[str, Any]:
    """``plan`` (from :func:`plan_bits`) improved by measuring whole plans instead of adding single layers.

    Starts from whichever is measured lower: the knapsack plan or the widest uniform width that fits the budget, so
    the result is never measured worse than that uniform plan on these batches. Then, in rounds, moves bits between
    layers: raise one layer a width and, when the budget needs it, lower another one width. A round measures the
    moves in the order the single-layer table predicts, ``moves_per_round`` at a time, and keeps the best of the
    first group that lowers the measured change. With batches held out (``JointMeasure(held_out=...)``) a move is
    kept only if it lowers the change on those too; otherwise the next improving move is checked. Stops when no move
    improves or after ``max_evaluations`` measurements (held-out ones included).

    Returns:
        ``plan`` with ``layers``, ``avg_bits``, ``total_bits`` of the refined plan and ``refine``: the measured
        change of the knapsack plan, of the widest uniform width that fits, of the start and of the result (and of
        the start and result on the held-out batches), the rounds, measurements and moves the held-out batches
        turned down.
    """
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations: must be >= 1, got {max_evaluations}")
    if moves_per_round < 1:
        raise ValueError(f"moves_per_round: must be >= 1, got {moves_per_round}")
    options = list(plan["bits_options"])
    names, params, deltas = _table(plan["sensitivity"], options, plan.get("monotone", True))
    size = dict(zip(names, params))
    limit = plan["total_bits"]
    if "avg_bits" in plan.get("budget", {}):
        limit = max(limit, math.floor(plan["budget"]["avg_bits"] * sum(params) + 1e-9))
    elif "bytes" in plan.get("budget", {}):
        limit = max(limit, 8 * plan["budget"]["bytes"])
    index = {name: i for i, name in enumerate(names)}
    start = {name: options.index(plan["layers"][name]) for name in names}
    used = measure.evaluations

    def total(choice: Mapping[str, int]) -> int:
        return sum(size[n] * options[c] for n, c in choice.items())

    def as_bits(choice: Mapping[str, int]) -> dict[str, int]:
        return {n: options[c] for n, c in choice.items()}

    knapsack = measure(as_bits(start))
    best, best_value, origin = dict(start), knapsack, "knapsack"
    uniform = {}
    fitting = [bits for bits in options if bits * sum(params) <= limit]
    if fitting:  # the widest uniform width within the budget: the baseline a plan has to beat
        widest = fitting[-1]
        uniform[widest] = measure({n: widest for n in names})
        if uniform[widest] < best_value:
            best, best_value, origin = {n: options.index(widest) for n in names}, uniform[widest], f"uniform_{widest}"
    checking = measure.held_out > 0
    best_check = measure(as_bits(best), held_out=True) if checking else None
    start_check, turned_down = best_check, 0
    rounds = 0
    while measure.evaluations - used < max_evaluations:
        slack = limit - total(best)
        moves = []
        for up in names:
            u = best[up]
            if u + 1 >= len(options):
                continue
            need = size[up] * (options[u + 1] - options[u])
            gain = deltas[index[up], u + 1] - deltas[index[up], u]  # predicted change, <= 0
            if need <= slack:
                moves.append((gain, {up: u + 1}))
                continue
            for down in names:
                d = best[down]
                if down == up or d == 0 or size[down] * (options[d] - options[d - 1]) + slack < need:
                    continue
                moves.append((gain + deltas[index[down], d - 1] - deltas[index[down], d], {up: u + 1, down: d - 1}))
        if not moves:
            break
        moves.sort(key=lambda move: move[0])
        rounds += 1
        improved = None
        # The predicted best moves first, a few at a time; the next few only when none of these measured better.
        for first in range(0, len(moves), moves_per_round):
            better = []
            for _, change in moves[first: first + moves_per_round]:
                if measure.evaluations - used >= max_evaluations:
                    break
                candidate = {**best, **change}
                value = measure(as_bits(candidate))
                if value < best_value:
                    better.append((value, candidate))
            for value, candidate in sorted(better, key=lambda pair: pair[0]):
                if not checking:
                    improved = (candidate, value, None)
                    break
                if measure.evaluations - used >= max_evaluations:
                    break
                check = measure(as_bits(candidate), held_out=True)
                if check < best_check:
                    improved = (candidate, value, check)
                    break
                turned_down += 1
            if improved is not None or measure.evaluations - used >= max_evaluations:
                break
        if improved is None:
            break
        best, best_value, best_check = improved
    bits = as_bits(best)
    total_bits = total(best)
    return {**plan, "layers": bits, "avg_bits": total_bits / sum(params), "total_bits": total_bits,
            "predicted_delta": float(sum(deltas[index[n], c] for n, c in best.items())),
            "refine": {"metric": measure.metric, "batches": len(measure.batches) - measure.held_out,
                       "knapsack_measured": knapsack,
                       "knapsack_layers": as_bits(start),
                       "uniform_measured": {str(b): v for b, v in uniform.items()}, "start": origin,
                       "measured_delta": best_value, "rounds": rounds,
                       "evaluations": measure.evaluations - used, "held_out_batches": measure.held_out,
                       "held_out_start": start_check, "held_out_delta": best_check,
                       "turned_down_by_held_out": turned_down}}


# ---------------------------------------------------------------------------------------------- plan files
def write_plan(plan: Mapping[str, Any], path: str | Path) -> Path:
    """Write a plan as JSON, atomically."""
    atomic_write_json(path, dict(plan))
    return Path(path)


def load_plan(path: str | Path, key: str = "plan") -> dict[str, int]:
    """The ``{layer: bits}`` of a plan file.

    Raises:
        FileNotFoundError: naming ``key`` and the path.
        ValueError: naming ``key``: not JSON, no ``layers`` mapping, or a width that is not an integer in [2, 8].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: plan file {path} does not exist; write it with "
                                f"`python -m plugins.quantization.sensitivity ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {path} is not JSON ({err})") from err
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{key}: {path} has no 'layers' mapping of layer name to bits")
    low, high = BITS["weights"]
    for name, bits in layers.items():
        if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
            raise ValueError(f"{key}.layers.{name}: bits must be an integer in [{low}, {high}], got {bits!r}")
    return dict(layers)


def plan_specs(plan: Mapping[str, int], model: nn.Module, selected: Iterable[str], weights: QuantSpec,
               key: str = "plan") -> dict[int, list[str]]:
    """Check a plan against the layers a plugin selected and group them by width.

    Raises:
        ValueError: naming the layer: a planned layer that is not a module of the model, one the plugin's
            ``targets`` do not select, or a selected layer the plan leaves out (never silently float or default).
    """
    selected = list(selected)
    modules = dict(model.named_modules())
    chosen = set(selected)
    for name in plan:
        if name not in modules:
            raise ValueError(f"{key}: layer {name} is not a module of the model; was the plan made for another model?")
        if name not in chosen:
            raise ValueError(f"{key}: layer {name} is not selected by targets; make the plan with the same targets")
    for name in selected:
        if name not in plan:
            raise ValueError(f"{key}: layer {name} is selected by targets but has no width in the plan")
    groups: dict[int, list[str]] = {}
    for name in selected:
        check_spec(dataclasses.replace(weights, bits=plan[name]), "weights", f"{key}.layers.{name}")
        groups.setdefault(plan[name], []).append(name)
    return groups


# ---------------------------------------------------------------------------------------------- command line
def format_table(plan: Mapping[str, Any]) -> str:
    """The per-layer choice with each layer's sensitivity at every width."""
    rows = plan["sensitivity"]
    options = plan["bits_options"]
    by_layer: dict[str, dict[int, float]] = {}
    params: dict[str, int] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], {})[int(row["bits"])] = float(row["delta"])
        params[row["layer"]] = int(row["params"])
    width = max(len(n) for n in by_layer)
    head = f"{'layer':<{width}}  {'params':>9}  " + "  ".join(f"{f'd@{b}':>10}" for b in options) + "  bits"
    lines = [head, "-" * len(head)]
    for name, deltas in by_layer.items():
        cells = "  ".join(f"{deltas.get(b, float('nan')):>10.4g}" for b in options)
        lines.append(f"{name:<{width}}  {params[name]:>9}  {cells}  {plan['layers'][name]:>4}")
    lines.append(f"budget {plan['budget']}: average {plan['avg_bits']:.4f} bits, predicted delta "
                 f"{plan['predicted_delta']:.4g}" + ("" if plan["exact"] else " (costs rounded up)"))
    return "\n".join(lines)


def _plugin_choice(plugins: list[Any]) -> tuple[ModuleSelection, QuantSpec]:
    """Targets and weight spec of the run's quantization plugin, or the defaults."""
    from plugins.quantization.common import QuantizedModules, default_targets

    for plugin in plugins:
        if isinstance(plugin, QuantizedModules) and plugin.weights is not None:
            return plugin.targets, plugin.weights
    return default_targets(), QuantSpec(bits=8, granularity="channel")


def calibration_batches(cli: Any, count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` training batches of a CLI-built run (model and datamodule, not yet fitted), from batch ``start``."""
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    if datamodule is None:
        raise ValueError("data: the config needs a datamodule to draw calibration batches from")
    trainer.strategy.connect(module)  # what fit does first: the datamodule reaches the model's processor
    datamodule.trainer = trainer
    datamodule.setup("fit")
    if hasattr(module, "match_processor"):  # as VLMModule.setup does under fit: the batches training would see
        module.match_processor(datamodule)
    if hasattr(datamodule, "training_batch"):
        return [datamodule.training_batch(i) for i in range(start, start + count)]
    batches = []
    for index, batch in enumerate(datamodule.train_dataloader()):
        if len(batches) >= count:
            break
        if index >= start:
            batches.append(batch)
    return batches


def earlier_sensitivity(path: str | Path, layers: Sequence[str], bits_options: Sequence[int]
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The sensitivity rows of an earlier plan file, checked against the layers and widths to plan for.

    Raises:
        FileNotFoundError: naming ``sensitivity_from`` and the path.
        ValueError: naming ``sensitivity_from``: not JSON, no table, a layer of the model or a width missing from the
            table, or a layer in it that the model's selection does not have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sensitivity_from: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"sensitivity_from: {path} is not JSON ({err})") from err
    rows = data.get("sensitivity") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"sensitivity_from: {path} has no 'sensitivity' table")
    measured = {(str(r.get("layer")), r.get("bits")) for r in rows}
    table_layers = {layer for layer, _ in measured}
    extra = sorted(table_layers - set(layers))
    if extra:
        raise ValueError(f"sensitivity_from: {path} measures {extra[0]}, which the run's targets do not select")
    for layer in layers:
        for bits in bits_options:
            if (layer, bits) not in measured:
                raise ValueError(f"sensitivity_from: {path} has no sensitivity of {layer} at {bits} bits")
    return [dict(r) for r in rows if r["bits"] in set(bits_options)], data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m plugins.quantization.sensitivity``: measure once, write one plan per budget, print the tables.

    Returns the plan, or ``{"plans": [...]}`` for several budgets."""
    parser = argparse.ArgumentParser(prog="python -m plugins.quantization.sensitivity",
                                     description="Per-layer quantization sensitivity and a mixed-precision plan.",
                                     allow_abbrev=False)  # other options go to the run's config parser
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint whose weights are measured (default: the config's)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget_avg_bits", type=float, nargs="+",
                        help="largest parameter-weighted average weight width (several: one plan each)")
    budget.add_argument("--budget_bytes", type=int, nargs="+",
                        help="largest size of the quantized weight codes in bytes (several: one plan each)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_BITS), help="candidate widths")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (training batches 0..n-1)")
    parser.add_argument("--metric", choices=METRICS, default="loss")
    parser.add_argument("--context_bits", type=int, default=None,
                        help="measure each layer with the other layers quantized at this width (default: float)")
    parser.add_argument("--sensitivity_from",
                        help="plan from the sensitivity table of this earlier plan JSON instead of measuring again "
                             "(same model, layers and --bits; the table's metric and settings are kept)")
    parser.add_argument("--refine_evaluations", type=int, default=0,
                        help="refine each plan by measuring whole plans (this many measurements per budget, each a "
                             "pass over the calibration batches; 0: the knapsack plan as it is)")
    parser.add_argument("--refine_moves", type=int, default=4, help="moves measured per refining round")
    parser.add_argument("--refine_batches", type=int, default=None,
                        help="measure whole plans on this many training batches after the sensitivity batches "
                             "(default: on the sensitivity batches themselves)")
    parser.add_argument("--refine_held_out", type=int, default=0,
                        help="of the batches whole plans are measured on, keep the last this many apart: a move is "
                             "kept only if it also improves them")
    parser.add_argument("--refine_metric", choices=JOINT_METRICS, default=None,
                        help="what whole plans are measured by (default: the sensitivity metric); disagreement is "
                             "one minus the top-1 agreement with the float model")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--pareto", type=float, nargs="*", default=None,
                        help="also print the predicted delta of the plans at these average-bits budgets")
    parser.add_argument("--out", required=True,
                        help="plan JSON to write; with several budgets a path containing {budget}")
    opts, rest = parser.parse_known_args(argv)
    if opts.batches < 1:
        raise SystemExit("--batches: must be >= 1")
    if opts.refine_evaluations < 0 or opts.refine_moves < 1 or (opts.refine_batches is not None and
                                                               opts.refine_batches < 1):
        raise SystemExit("--refine_evaluations: must be >= 0; --refine_moves and --refine_batches: must be >= 1")
    budgets = [("budget_avg_bits", b) for b in opts.budget_avg_bits or []] + \
              [("budget_bytes", b) for b in opts.budget_bytes or []]
    if len(budgets) > 1 and "{budget}" not in opts.out:
        raise SystemExit(f"--out: {len(budgets)} budgets need a path containing {{budget}}, got {opts.out!r}")
    from framework.cli import build
    from framework.io import load_checkpoint_weights
    from framework.plugin import find_plugins

    cli = build([a for c in opts.config for a in ("--config", c)] + rest, run=False)
    targets, template = _plugin_choice(find_plugins(cli.trainer))
    module = cli.model
    if opts.ckpt_path:
        weights = load_checkpoint_weights(opts.ckpt_path)
        state = module.state_dict()
        missing = [k for k in state if k not in weights and not k.startswith(("val_metrics", "val_losses"))]
        if missing:
            raise ValueError(f"ckpt_path: {opts.ckpt_path} does not match the config's model (missing {missing[:5]})")
        module.load_state_dict({k: v for k, v in weights.items() if k in state}, strict=False)
    # Whole plans may be measured on other batches than the table (the ones after it), so refining does not fit
    # the same few batches the single-layer table was measured on.
    drawn = calibration_batches(cli, opts.batches + (opts.refine_batches or 0))
    batches, refine_batches = drawn[: opts.batches], drawn[opts.batches:] or drawn[: opts.batches]
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device)
    # What does not depend on the budget is computed once and shared by every plan.
    shared: dict[str, Any] = {"metric": opts.metric, "spec": template.to_dict(), "batches": opts.batches,
                              "context_bits": opts.context_bits, "configs": opts.config,
                              "checkpoint": opts.ckpt_path}
    if opts.sensitivity_from:
        rows, measured = earlier_sensitivity(opts.sensitivity_from, list(targets.select(module.model)), opts.bits)
        shared.update({key: measured.get(key) for key in ("metric", "spec", "batches", "context_bits")},
                      sensitivity_from=str(opts.sensitivity_from))
        opts.metric = shared["metric"] or opts.metric  # refining measures whole plans with the table's metric
    else:
        with cli.trainer.precision_plugin.forward_context():  # the run's precision (e.g. bf16 autocast)
            rows = measure_sensitivity(module.model, batches, targets, opts.bits, template, opts.metric,
                                       context_bits=opts.context_bits)
    if opts.pareto:
        shared["pareto"] = pareto_curve(rows, opts.pareto, opts.bits)
    uniform: dict[str, float] | None = None
    plans = []
    measure = None
    if opts.refine_evaluations:
        measure = JointMeasure(module.model, refine_batches, list(dict.fromkeys(r["layer"] for r in rows)), template,
                               opts.refine_metric or opts.metric, held_out=opts.refine_held_out)
    with contextlib.ExitStack() as stack:
        if measure is not None:
            stack.enter_context(cli.trainer.precision_plugin.forward_context())
            stack.enter_context(measure)
        for key, value in budgets:
            plan = plan_bits(rows, bits_options=opts.bits, **{key: value})
            if measure is not None:
                plan = refine_plan(plan, measure, opts.refine_evaluations, opts.refine_moves)
            plans.append(plan)
    for (key, value), plan in zip(budgets, plans):
        if uniform is None:
            uniform = {str(b): uniform_delta(rows, b, opts.bits) for b in plan["bits_options"]}
        plan.update({**shared, "uniform_delta": uniform})
        out = opts.out.replace("{budget}", f"{value:g}")
        write_plan(plan, out)
        print(format_table(plan))
        print("uniform: " + ", ".join(f"{b} bits {d:.4g}" for b, d in plan["uniform_delta"].items()))
        if "refine" in plan:
            refine = plan["refine"]
            print(f"measured jointly ({refine['metric']}): knapsack {refine['knapsack_measured']:.4g}, "
                  + ", ".join(f"uniform {b} bits {v:.4g}" for b, v in refine["uniform_measured"].items())
                  + f", refined {refine['measured_delta']:.4g} (from {refine['start']}, "
                  f"{refine['evaluations']} measurements)")
        print(f"plan written to {out}")
    if opts.pareto:
        print(f"{'budget':>8}  {'avg_bits':>8}  {'predicted_delta':>15}")
        for point in plans[0]["pareto"]:
            avg = "-" if point["avg_bits"] is None else f"{point['avg_bits']:.4f}"
            delta = "infeasible" if point["predicted_delta"] is None else f"{point['predicted_delta']:.4g}"
            print(f"{point['budget_avg_bits']:>8.3g}  {avg:>8}  {delta:>15}")
    return plans[0] if len(plans) == 1 else {"plans": plans}


if __name__ == "__main__":
    main(sys.argv[1:])
