"""Mixed precision: per-layer sensitivity, the budgeted planner, the plan CLI and plans in QAT / PTQ."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILY_SPECS
from helpers import make_cli, tiny_config

from framework.data.tasks import make_task
from framework.models import load_vlm
from framework.module import model_inputs
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from plugins.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantSpec,
    export_encodings,
    load_plan,
    measure_sensitivity,
    plan_bits,
    quantization_disabled,
    quantizers_of,
    write_plan,
)
from plugins.quantization.encodings import decode_entries
from plugins.quantization.sensitivity import (
    JointMeasure,
    calibration_batches,
    pareto_curve,
    refine_plan,
    uniform_delta,
)
from plugins.quantization.plan_check import check_plans, format_check, sign_test_p
from plugins.quantization.plan_check import main as plan_check_main
from plugins.quantization.sensitivity import main as sensitivity_main

LM = ModuleSelection(include="language_model", exclude="lm_head")
OPTIONS = (2, 3, 4, 8)


def _batches(loaded, count: int = 2) -> list[dict]:  # noqa: ANN001
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    caption, autofill = make_task("caption", image_size=64), make_task("autofill", image_size=64)
    return [processor.encode([caption[2 * i], autofill[2 * i + 1]]) for i in range(count)]


def _lm_layers(model: torch.nn.Module) -> list[str]:
    return list(LM.select(model))


def _fit(model: torch.nn.Module, batches: list[dict], steps: int = 40) -> None:
    """Fit the batches a little: a random model sits nowhere near a loss minimum, so quantization noise there
    moves its loss either way; a fitted one loses more the coarser its weights."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_sensitivity_rows_and_lower_bits_hurt_more(metric: str) -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    batches = _batches(loaded)
    if metric == "loss":
        _fit(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = model.training
    rows = measure_sensitivity(model, batches, LM, OPTIONS, QuantSpec(bits=8, granularity="channel"),
                               metric=metric)
    layers = _lm_layers(model)
    assert len(rows) == len(layers) * len(OPTIONS) == 14 * 4
    assert [(r["layer"], r["bits"]) for r in rows] == [(n, b) for n in layers for b in OPTIONS]
    for row in rows:
        assert set(row) == {"layer", "params", "bits", "delta"}
        assert row["params"] == model.get_submodule(row["layer"]).weight.numel()
    mean = {b: sum(r["delta"] for r in rows if r["bits"] == b) / len(layers) for b in OPTIONS}
    assert mean[2] > mean[3] > max(mean[4], mean[8]), mean
    if metric == "kl":
        # The loss change at 4 and 8 bits is at float noise on this tiny model (~1e-6, either order across CPUs);
        # the KL is not, and orders every width.
        assert all(r["delta"] >= -1e-6 for r in rows)
        assert mean[4] > mean[8], mean
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights are restored exactly"
    assert model.training == mode, "train / eval modes are restored"


def test_sensitivity_in_a_quantized_context() -> None:
    """With context_bits every other layer is quantized meanwhile: each row at that width is the uniformly quantized
    model (one value), a layer's own width still orders its row, and every weight comes back exactly."""
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    batches = _batches(loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits=8, granularity="channel")
    alone = measure_sensitivity(model, batches, LM, OPTIONS, spec, metric="kl")
    rows = measure_sensitivity(model, batches, LM, OPTIONS, spec, metric="kl", context_bits=3)
    assert [(r["layer"], r["bits"]) for r in rows] == [(r["layer"], r["bits"]) for r in alone]
    at_context = [r["delta"] for r in rows if r["bits"] == 3]
    assert max(at_context) - min(at_context) <= 1e-6 * max(at_context)
    # The uniformly 3-bit model is further from float than any one layer at 3 bits alone.
    assert min(at_context) > max(r["delta"] for r in alone if r["bits"] == 3)
    mean = {b: sum(r["delta"] for r in rows if r["bits"] == b) / len(at_context) for b in OPTIONS}
    assert mean[2] > mean[3] > mean[4], mean
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights are restored exactly"
    with pytest.raises(ValueError, match=r"context_bits: must be a non-empty list of integers in \[2, 8\]"):
        measure_sensitivity(model, batches, LM, OPTIONS, spec, metric="kl", context_bits=1)


def test_sensitivity_misconfiguration() -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    batches = _batches(loaded, 1)
    with pytest.raises(ValueError, match="metric: must be one of 'loss', 'kl'"):
        measure_sensitivity(loaded.model, batches, LM, metric="mse")
    with pytest.raises(ValueError, match=r"bits_options: must be a non-empty list of integers in \[2, 8\]"):
        measure_sensitivity(loaded.model, batches, LM, bits_options=(1, 4))
    with pytest.raises(ValueError, match="layers: model.nothing is not a module"):
        measure_sensitivity(loaded.model, batches, ["model.nothing"])
    with pytest.raises(ValueError, match="layers: model.language_model.norm is a LlamaRMSNorm"):
        measure_sensitivity(loaded.model, batches, ["model.language_model.norm"])
    with pytest.raises(ValueError, match="batches: give at least one"):
        measure_sensitivity(loaded.model, [], LM)
    unlabelled = [{k: v for k, v in batches[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="metric: 'loss' needs batches with 'labels'"):
        measure_sensitivity(loaded.model, unlabelled, LM, metric="loss")
    with pytest.raises(ValueError, match="spec_template: does not fit model.language_model.layers.0.self_attn.q_proj"):
        measure_sensitivity(loaded.model, batches, LM, (4,), QuantSpec(bits=4, granularity="group", group_size=24))


# ---------------------------------------------------------------------------------------------- joint refining
def test_joint_measure_is_the_uniform_context_row_and_restores_weights() -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    batches = _batches(loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits=8, granularity="channel")
    layers = _lm_layers(model)
    context = measure_sensitivity(model, batches, LM, (3, 4), spec, metric="kl", context_bits=3)
    with JointMeasure(model, batches, layers, spec, metric="kl") as measure:
        three = measure(dict.fromkeys(layers, 3))
        eight = measure(dict.fromkeys(layers, 8))
        two = measure(dict.fromkeys(layers, 2))
        assert measure(dict.fromkeys(layers, 3)) == pytest.approx(three, rel=1e-9), "a plan measures the same twice"
        with pytest.raises(ValueError, match=f"plan: layer {layers[0]} has no width"):
            measure(dict.fromkeys(layers[1:], 4))
    assert three == pytest.approx(next(r["delta"] for r in context if r["bits"] == 3), rel=1e-5)
    assert two > three > eight >= 0
    assert measure.evaluations == 4
    # Top-1 disagreement: the share of scored tokens whose argmax differs from the float model's.
    def argmax(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
        return logits[batch["labels"][:, 1:] != -100].argmax(-1)

    model.eval()
    float_argmax = torch.cat([argmax(b) for b in batches])
    with JointMeasure(model, batches, layers, spec, metric="disagreement") as measure:
        two_bits = measure(dict.fromkeys(layers, 2))  # the model now holds the 2-bit weights
        changed = float((torch.cat([argmax(b) for b in batches]) != float_argmax).float().mean())
        assert measure(dict.fromkeys(layers, 8)) <= two_bits
    assert two_bits == pytest.approx(changed) and 0 < two_bits <= 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights are restored exactly"
    with pytest.raises(ValueError, match="metric: must be one of"):
        JointMeasure(model, batches, layers, metric="mse")
    with pytest.raises(ValueError, match="batches: give at least one"):
        JointMeasure(model, [], layers)
    with pytest.raises(RuntimeError, match="inside `with JointMeasure"):
        JointMeasure(model, batches, layers)(dict.fromkeys(layers, 4))
    with pytest.raises(ValueError, match=r"held_out: must be in \[0, 1\] for 2 batches, got 2"):
        JointMeasure(model, batches, layers, held_out=2)
    # One batch searched, one held out: each measures its own batch, as a measure of that batch alone would.
    with JointMeasure(model, batches, layers, spec, metric="kl", held_out=1) as split:
        searched, kept_apart = split(dict.fromkeys(layers, 3)), split(dict.fromkeys(layers, 3), held_out=True)
    for batch, value in ((batches[0], searched), (batches[1], kept_apart)):
        with JointMeasure(model, [batch], layers, spec, metric="kl") as alone:
            assert alone(dict.fromkeys(layers, 3)) == pytest.approx(value, rel=1e-6)
    with JointMeasure(model, batches, layers, spec) as whole, pytest.raises(ValueError, match="keeps no batch apart"):
        whole(dict.fromkeys(layers, 3), held_out=True)


def test_refined_plan_is_measured_no_worse_than_uniform_and_keeps_the_budget() -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    batches = _batches(loaded)
    spec = QuantSpec(bits=8, granularity="channel")
    rows = measure_sensitivity(model, batches, LM, OPTIONS, spec, metric="kl")
    for budget in (3.0, 3.5):
        plan = plan_bits(rows, budget_avg_bits=budget, bits_options=OPTIONS)
        with JointMeasure(model, batches, _lm_layers(model), spec, metric="kl") as measure:
            refined = refine_plan(plan, measure, max_evaluations=12, moves_per_round=3)
            measured_again = measure(refined["layers"])
        info = refined["refine"]
        assert refined["avg_bits"] <= budget + 1e-9 and set(refined["layers"]) == set(plan["layers"])
        assert info["measured_delta"] == pytest.approx(measured_again, rel=1e-9)
        assert info["measured_delta"] <= min(info["knapsack_measured"], *info["uniform_measured"].values())
        assert list(info["uniform_measured"]) == ["3"]  # the widest uniform width within the budget
        # the budget of measurements counts the knapsack plan and the uniform one too
        assert 2 <= info["evaluations"] <= 12 and measure.evaluations == info["evaluations"] + 1
    with pytest.raises(ValueError, match="max_evaluations: must be >= 1"):
        refine_plan(plan, measure, max_evaluations=0)
    # With a batch held out, every kept move lowers the change on it too.
    plan = plan_bits(rows, budget_avg_bits=3.0, bits_options=OPTIONS)
    with JointMeasure(model, batches, _lm_layers(model), spec, metric="kl", held_out=1) as measure:
        refined = refine_plan(plan, measure, max_evaluations=30, moves_per_round=3)
        info = refined["refine"]
        assert info["held_out_batches"] == 1 and info["batches"] == 1
        assert info["held_out_delta"] == pytest.approx(measure(refined["layers"], held_out=True), rel=1e-9)
    assert info["held_out_delta"] <= info["held_out_start"] and info["measured_delta"] <= info["knapsack_measured"]
    assert info["evaluations"] <= 30 and info["turned_down_by_held_out"] >= 0


# ---------------------------------------------------------------------------------------------- planner
def _table(params: list[int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index, size in enumerate(params):
        scale = rng.uniform(0.01, 5.0)
        for bits in OPTIONS:
            rows.append({"layer": f"layer{index}", "params": size, "bits": bits,
                         "delta": scale * (1.0 + 0.3 * rng.random()) * 2.0 ** (-bits)})  # falls with bits
    return rows


def _brute_force(rows: list[dict], budget_avg_bits: float) -> float:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    params = {r["layer"]: r["params"] for r in rows}
    delta = {(r["layer"], r["bits"]): r["delta"] for r in rows}
    total = sum(params.values())
    best = float("inf")
    for choice in itertools.product(OPTIONS, repeat=len(layers)):
        if sum(params[n] * b for n, b in zip(layers, choice)) <= budget_avg_bits * total:
            best = min(best, sum(delta[(n, b)] for n, b in zip(layers, choice)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planner_is_optimal_and_within_budget(seed: int) -> None:
    rows = _table([4096, 1024, 2048, 4096, 8192, 1024], seed)
    for budget in (2.0, 2.5, 3.0, 3.7, 4.0, 5.5, 8.0, 9.0):
        plan = plan_bits(rows, budget_avg_bits=budget, bits_options=OPTIONS)
        assert plan["exact"] and plan["avg_bits"] <= budget + 1e-12
        params = {r["layer"]: r["params"] for r in rows}
        delta = {(r["layer"], r["bits"]): r["delta"] for r in rows}
        assert plan["avg_bits"] == pytest.approx(sum(params[n] * b for n, b in plan["layers"].items())
                                                 / sum(params.values()))
        assert plan["predicted_delta"] == pytest.approx(sum(delta[(n, b)] for n, b in plan["layers"].items()))
        assert plan["predicted_delta"] == pytest.approx(_brute_force(rows, budget), rel=1e-12, abs=1e-15)


def test_planner_beats_uniform_at_equal_budget() -> None:
    # Two small layers that 2 bits ruin and two large ones that barely notice: at an average of 4 bits the plan
    # keeps the sensitive ones at 8 and drops the robust ones, far below uniform 4 bit.
    rows = []
    for name, size, scale in (("a", 1000, 100.0), ("b", 1000, 80.0), ("c", 4000, 0.1), ("d", 4000, 0.2)):
        rows += [{"layer": name, "params": size, "bits": b, "delta": scale * 2.0 ** (-b)} for b in OPTIONS]
    plan = plan_bits(rows, budget_avg_bits=4.0, bits_options=OPTIONS)
    assert plan["avg_bits"] <= 4.0
    assert plan["layers"]["a"] == 8 and plan["layers"]["b"] == 8 and plan["layers"]["c"] < 4
    assert plan["predicted_delta"] < 0.5 * uniform_delta(rows, 4)
    by_bytes = plan_bits(rows, budget_bytes=10_000 * 4 // 8, bits_options=OPTIONS)
    assert by_bytes["layers"] == plan["layers"] and by_bytes["budget"] == {"bytes": 5000}
    curve = pareto_curve(rows, [1.5, 2.0, 3.0, 4.0, 6.0, 8.0], OPTIONS)
    assert curve[0]["predicted_delta"] is None
    deltas = [p["predicted_delta"] for p in curve[1:]]
    assert deltas == sorted(deltas, reverse=True), "more bits never predict a larger delta"


def test_noisy_deltas_never_make_fewer_bits_look_better() -> None:
    # A measured loss change can be negative or rise with bits (noise, a model away from its loss minimum);
    # planned on the monotone envelope, the spare budget goes to wider weights instead of rewarding noise.
    rows = []
    for name, noise in (("a", -0.002), ("b", 0.001), ("c", -0.0005)):
        rows += [{"layer": name, "params": 1024, "bits": b, "delta": d}
                 for b, d in zip(OPTIONS, (noise, 0.003 + noise, 0.0001, 0.00005))]
    plan = plan_bits(rows, budget_avg_bits=4.0, bits_options=OPTIONS)
    assert plan["monotone"] and plan["avg_bits"] == 4.0 and set(plan["layers"].values()) == {4}
    assert plan["predicted_delta"] == pytest.approx(3 * 0.0001)
    raw = plan_bits(rows, budget_avg_bits=4.0, bits_options=OPTIONS, monotone=False)
    assert raw["layers"]["a"] == 2 and raw["predicted_delta"] < 0


def test_planner_rounds_costs_up_when_the_budget_is_huge(monkeypatch: pytest.MonkeyPatch) -> None:
    import plugins.quantization.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "MAX_STATES", 500)
    rows = _table([1009, 1013, 1019, 1021, 1031, 1033], 3)  # coprime sizes: the exact DP needs ~19k states
    for budget in (2.2, 3.3, 4.0, 6.1):
        plan = plan_bits(rows, budget_avg_bits=budget, bits_options=OPTIONS)
        assert not plan["exact"] and plan["avg_bits"] <= budget
        assert plan["predicted_delta"] <= _brute_force(rows, budget) * 1.5 + 1e-12


def test_impossible_budget_names_the_key() -> None:
    rows = _table([64, 128], 0)
    with pytest.raises(ValueError, match=r"budget_avg_bits: 1.5 cannot be met: every layer at the smallest width "
                                         r"\(2 bits\)"):
        plan_bits(rows, budget_avg_bits=1.5, bits_options=OPTIONS)
    with pytest.raises(ValueError, match="budget_avg_bits: 3.5 cannot be met.*4 bits"):
        plan_bits(rows, budget_avg_bits=3.5, bits_options=(4, 8))
    with pytest.raises(ValueError, match="budget_bytes: 10 cannot be met"):
        plan_bits(rows, budget_bytes=10, bits_options=OPTIONS)
    with pytest.raises(ValueError, match="budget_avg_bits / budget_bytes: give exactly one"):
        plan_bits(rows, budget_avg_bits=4.0, budget_bytes=100, bits_options=OPTIONS)
    with pytest.raises(ValueError, match="rows: no sensitivity of layer0 at 5 bits"):
        plan_bits(rows, budget_avg_bits=4.0, bits_options=(2, 5))


# ---------------------------------------------------------------------------------------------- CLI and plugins
def _qat(plan: str | None = None, **kwargs) -> dict:  # noqa: ANN003
    return {"class_path": "plugins.quantization.QuantizationAwareTraining",
            "init_args": {"weights": {"bits": 4, "granularity": "channel"}, "plan": plan, **kwargs}}


def test_cli_writes_a_plan_that_qat_trains_with(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan_path = tmp_path / "results" / "plan_avg4.json"
    # The same config makes the plan and then trains with it (the plan is read only when the model is built).
    config = tiny_config(tmp_path, max_steps=2, callbacks=[_qat(str(plan_path))], limit_val_batches=0)
    sensitivity_main(["--config", str(config), "--budget_avg_bits", "4", "--bits", "2", "3", "4", "8",
                      "--batches", "2", "--metric", "kl", "--pareto", "2.5", "3", "4", "8", "--out", str(plan_path)])
    printed = capsys.readouterr().out
    assert "predicted delta" in printed and "plan written to" in printed and "infeasible" not in printed
    plan = json.loads(plan_path.read_text())
    assert len(plan["layers"]) == 14 and plan["avg_bits"] <= 4.0 and plan["budget"] == {"avg_bits": 4.0}
    assert len(plan["sensitivity"]) == 14 * 4 and plan["metric"] == "kl" and plan["spec"]["granularity"] == "channel"
    assert [p["budget_avg_bits"] for p in plan["pareto"]] == [2.5, 3.0, 4.0, 8.0]
    assert plan["pareto"][-1]["predicted_delta"] <= plan["predicted_delta"] <= plan["pareto"][0]["predicted_delta"]
    assert plan["predicted_delta"] <= plan["uniform_delta"]["4"] + 1e-12
    assert load_plan(plan_path) == plan["layers"]

    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    weights = {n[: -len(".weight")]: q for n, q in quantizers_of(cli.model.model).items() if n.endswith(".weight")}
    assert {n: q.spec.bits for n, q in weights.items()} == plan["layers"]
    assert all(q.spec.granularity == "channel" and q.is_initialized for q in weights.values())
    summary = plugin.summary(cli.model.model)
    assert summary["weight_bits"] == pytest.approx(plan["avg_bits"]) and summary["plan"] == str(plan_path)
    # The trained checkpoint (quantizer states beside the weights) is measured too, under a bytes budget.
    again = sensitivity_main(["--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                              "--budget_bytes", str(plan["total_bits"] // 8), "--batches", "1",
                              "--out", str(tmp_path / "plan_bytes.json")])
    assert again["checkpoint"].endswith("last.ckpt") and again["total_bits"] <= plan["total_bits"]
    assert again["sensitivity"] != plan["sensitivity"]


def test_cli_refines_plans_by_measuring_them_whole(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(tmp_path, max_steps=1, callbacks=[_qat()], limit_val_batches=0)
    common = ["--config", str(config), "--bits", "2", "3", "4", "8", "--batches", "1", "--metric", "kl"]
    with pytest.raises(SystemExit, match="--refine_evaluations: must be >= 0"):
        sensitivity_main([*common, "--budget_avg_bits", "3", "--refine_evaluations", "-1",
                          "--out", str(tmp_path / "p.json")])
    result = sensitivity_main([*common, "--budget_avg_bits", "3", "4", "--refine_evaluations", "6",
                               "--out", str(tmp_path / "plan_avg{budget}.json")])
    assert "measured jointly (kl)" in capsys.readouterr().out
    by_agreement = sensitivity_main([*common, "--budget_avg_bits", "4", "--refine_evaluations", "3", "--refine_metric",
                                     "disagreement", "--refine_batches", "3", "--refine_held_out", "1",
                                     "--out", str(tmp_path / "plan_agreement.json")])
    assert by_agreement["refine"]["metric"] == "disagreement" and by_agreement["metric"] == "kl"
    assert by_agreement["refine"]["batches"] == 2 and by_agreement["refine"]["held_out_batches"] == 1
    assert result["plans"][0]["refine"]["batches"] == 1 and result["plans"][0]["refine"]["held_out_delta"] is None
    assert 0 <= by_agreement["refine"]["measured_delta"] <= 1
    for plan in result["plans"]:
        refine = json.loads((tmp_path / f"plan_avg{plan['budget']['avg_bits']:g}.json").read_text())["refine"]
        assert refine == plan["refine"] and refine["evaluations"] <= 6
        assert plan["avg_bits"] <= plan["budget"]["avg_bits"]
        assert refine["measured_delta"] <= min(refine["knapsack_measured"], *refine["uniform_measured"].values())
    assert load_plan(tmp_path / "plan_avg3.json") == result["plans"][0]["layers"]
    # An earlier measurement planned again without measuring: the same knapsack plan.
    again = sensitivity_main([*common, "--budget_avg_bits", "3", "--sensitivity_from", str(tmp_path / "plan_avg3.json"),
                              "--out", str(tmp_path / "again.json")])
    assert again["layers"] == result["plans"][0]["refine"]["knapsack_layers"]
    assert again["sensitivity"] == result["plans"][0]["sensitivity"] and again["sensitivity_from"].endswith("avg3.json")
    with pytest.raises(ValueError, match=r"sensitivity_from: .* has no sensitivity of model\..* at 5 bits"):
        sensitivity_main([*common[:-4], "--bits", "2", "5", "--batches", "1", "--budget_avg_bits", "3",
                          "--sensitivity_from", str(tmp_path / "plan_avg3.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(FileNotFoundError, match="sensitivity_from: .*missing.json does not exist"):
        sensitivity_main([*common, "--budget_avg_bits", "3", "--sensitivity_from", str(tmp_path / "missing.json"),
                          "--out", str(tmp_path / "x.json")])


def test_cli_plans_several_budgets_from_one_measurement(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=1, callbacks=[_qat()], limit_val_batches=0)
    common = ["--config", str(config), "--bits", "2", "4", "8", "--batches", "1"]
    with pytest.raises(SystemExit, match=r"--out: 2 budgets need a path containing \{budget\}"):
        sensitivity_main([*common, "--budget_avg_bits", "3", "5", "--out", str(tmp_path / "plan.json")])
    result = sensitivity_main([*common, "--budget_avg_bits", "3", "5", "--out", str(tmp_path / "plan_avg{budget}.json")])
    low, high = (json.loads((tmp_path / f"plan_avg{b}.json").read_text()) for b in (3, 5))
    assert [p["budget"] for p in result["plans"]] == [{"avg_bits": 3.0}, {"avg_bits": 5.0}]
    assert low["avg_bits"] <= 3.0 < high["avg_bits"] <= 5.0
    assert low["sensitivity"] == high["sensitivity"]  # one measurement behind both plans
    assert low["predicted_delta"] >= high["predicted_delta"]


@pytest.mark.parametrize("cls", [QuantizationAwareTraining, PostTrainingQuantization])
def test_plan_sets_bits_and_encodings(tmp_path: Path, cls: type) -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    layers = _lm_layers(model)
    bits = {name: OPTIONS[i % len(OPTIONS)] for i, name in enumerate(layers)}
    path = write_plan({"layers": bits}, tmp_path / "plan.json")
    plugin = cls(weights=QuantSpec(bits=8, granularity="channel"),
                 activations=QuantSpec(bits=8, granularity="tensor", symmetric=False), plan=str(path))
    plugin.transform(model)
    plugin.transform(model)  # idempotent
    assert {n[: -len(".weight")]: q.spec.bits for n, q in plugin.quantizers.items() if n.endswith(".weight")} == bits
    assert sum(1 for n in plugin.quantizers if n.endswith(".input")) == len(layers)
    plugin.init_weight_quantizers(model)
    encodings = export_encodings(model, {n for n in plugin.quantizers if n.endswith(".weight")})
    for name, want in bits.items():
        entries = encodings["param_encodings"][f"{name}.weight"]
        assert {e["bitwidth"] for e in entries} == {want}
        decode_entries(f"{name}.weight", entries, want, True)
    sizes = {n: model.get_submodule(n).weight.numel() for n in layers}
    want_avg = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes.values())
    assert plugin.summary(model)["weight_bits"] == pytest.approx(want_avg)
    assert plugin.config_echo()["plan"] == bits


def test_plan_mismatch_names_the_layer(tmp_path: Path) -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    layers = _lm_layers(model)
    full = dict.fromkeys(layers, 4)
    cases = [
        ({**full, "model.language_model.layers.7.mlp.up_proj": 4},
         r"qat.plan: layer model.language_model.layers.7.mlp.up_proj is not a module of the model"),
        ({**full, "lm_head": 8}, r"qat.plan: layer lm_head is not selected by targets"),
        ({n: b for n, b in full.items() if n != layers[3]},
         rf"qat.plan: layer {layers[3]} is selected by targets but has no width in the plan"),
        ({**full, layers[0]: 12}, rf"qat.plan.layers.{layers[0]}: bits must be an integer in \[2, 8\]"),
    ]
    for index, (bits, message) in enumerate(cases):
        path = write_plan({"layers": bits}, tmp_path / f"plan{index}.json")
        target = load_vlm(str(FAMILY_SPECS["llava"])).model
        with pytest.raises(ValueError, match=message):
            QuantizationAwareTraining(weights=QuantSpec(bits=4), plan=str(path)).transform(target)
        assert not quantizers_of(target), "nothing is attached on an error"
    with pytest.raises(FileNotFoundError, match="qat.plan: plan file .*missing.json does not exist"):
        QuantizationAwareTraining(weights=QuantSpec(bits=4), plan=str(tmp_path / "missing.json")).transform(model)
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="qat.plan: .*empty.json has no 'layers' mapping"):
        QuantizationAwareTraining(weights=QuantSpec(bits=4), plan=str(tmp_path / "empty.json")).transform(model)
    with pytest.raises(ValueError, match="QuantizationAwareTraining.plan: a plan sets per-layer weight bits"):
        QuantizationAwareTraining(weights=None, activations=QuantSpec(bits=8, granularity="tensor"), plan="p.json")
    with pytest.raises(ValueError, match="PostTrainingQuantization.plan: must be the path"):
        PostTrainingQuantization(plan="")


# ---------------------------------------------------------------------------------------------- checking plans
def test_sign_test_p_values() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32) and sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(10, 10) == 1.0
    assert sign_test_p(20, 5) < 0.01 < sign_test_p(12, 8)


def test_check_plans_pairs_plans_with_uniform_widths_token_by_token() -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model, batches = loaded.model, _batches(loaded, 3)
    _fit(model, batches)
    layers = _lm_layers(model)
    spec = QuantSpec(bits=8, granularity="channel")
    coarse = {**dict.fromkeys(layers, 8), layers[0]: 2, layers[1]: 2}
    with JointMeasure(model, batches, layers, spec, metric="disagreement") as measure:
        result = check_plans(measure, {"same_as_4": dict.fromkeys(layers, 4), "coarse": coarse}, [2, 4])
        disagreement_2 = measure(dict.fromkeys(layers, 2))
    rows = result["rows"]
    assert rows["same_as_4"] == rows["uniform_4"]  # one plan, one measurement
    assert rows["uniform_2"]["disagreement"] == pytest.approx(disagreement_2)
    assert rows["uniform_2"]["disagreeing_tokens"] == round(disagreement_2 * result["scored_tokens"])
    pairs = {(p["plan"], p["uniform"]): p for p in result["pairs"]}
    same = pairs[("same_as_4", 4)]
    assert same["only_plan_wrong"] == same["only_uniform_wrong"] == 0 and same["sign_test_p"] == 1.0
    # Discordant counts are the difference of the two plans' disagreeing tokens, token by token.
    vs_two = pairs[("coarse", 2)]
    assert vs_two["only_plan_wrong"] - vs_two["only_uniform_wrong"] == (rows["coarse"]["disagreeing_tokens"]
                                                                       - rows["uniform_2"]["disagreeing_tokens"])
    assert "uniform 2 bits: only the plan wrong on" in format_check(result)
    with JointMeasure(model, batches, layers, spec, metric="kl") as measure:
        with pytest.raises(ValueError, match="disagreeing_tokens: needs metric 'disagreement'"):
            measure.disagreeing_tokens(coarse)
        kl = check_plans(measure, {"coarse": coarse}, [8])
    assert kl["pairs"] == [] and kl["rows"]["coarse"]["kl"] > kl["rows"]["uniform_8"]["kl"] >= 0


def test_plan_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(tmp_path, max_steps=1, callbacks=[_qat()], limit_val_batches=0)
    plan_path = tmp_path / "plans" / "plan_avg4.json"
    sensitivity_main(["--config", str(config), "--budget_avg_bits", "4", "--bits", "2", "4", "8", "--batches", "1",
                      "--metric", "kl", "--out", str(plan_path)])
    out = tmp_path / "check.json"
    result = plan_check_main(["--config", str(config), "--plans", str(plan_path), "--uniform", "4", "--skip", "1",
                              "--batches", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["batches"] == 2 and result["skip"] == 1 and set(result["rows"]) == {"plan_avg4", "uniform_4"}
    assert "plan_avg4 vs uniform 4 bits" in capsys.readouterr().out
    other = json.loads(plan_path.read_text())
    other["layers"].pop(next(iter(other["layers"])))
    (tmp_path / "other").mkdir()
    write_plan(other, tmp_path / "other" / "plan_avg4.json")
    with pytest.raises(SystemExit, match="--plans: other/plan_avg4 plans other layers than plans/plan_avg4"):
        plan_check_main(["--config", str(config), "--plans", str(plan_path), str(tmp_path / "other" / "plan_avg4.json")])
    with pytest.raises(SystemExit, match=r"--uniform: widths must be in \[2, 8\]"):
        plan_check_main(["--config", str(config), "--plans", str(plan_path), "--uniform", "9"])
    with pytest.raises(FileNotFoundError, match="--plans: plan file .*missing.json does not exist"):
        plan_check_main(["--config", str(config), "--plans", str(tmp_path / "missing.json")])


def test_joint_measure_calibrates_activations_for_each_plan() -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model, batches = loaded.model, _batches(loaded)
    layers = _lm_layers(model)
    spec = QuantSpec(bits=8, granularity="channel")
    with JointMeasure(model, batches, layers, spec, metric="kl") as measure:
        floating = measure(dict.fromkeys(layers, 4))
    ptq = PostTrainingQuantization(weights=None, activations=QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                   calibration_batches=1)
    ptq.transform(model)
    last = [q for n, q in ptq.quantizers.items() if n.endswith(".input")][-1]  # reads quantized layers' outputs
    calls, scales = [], []

    def calibrate() -> None:
        ptq.recalibrate(model, batches[:1])
        calls.append(1)
        scales.append(last.scale.detach().clone())

    with JointMeasure(model, batches, layers, spec, metric="kl", calibrate_activations=calibrate) as measure:
        four = measure(dict.fromkeys(layers, 4))
        assert measure(dict.fromkeys(layers, 4)) == four, "an unchanged plan keeps its encodings"
        two = measure(dict.fromkeys(layers, 2))
        assert measure(dict.fromkeys(layers, 4)) == pytest.approx(four, rel=1e-9)
    assert len(calls) == 3 and four != floating and two > four > 0
    # Each calibration starts from scratch: the 4-bit plan's encodings again, not widened by the 2-bit plan's ranges.
    assert torch.equal(scales[0], scales[2]) and not torch.equal(scales[0], scales[1])
    assert not any(q.enabled for q in quantizers_of(model).values()), "quantizers are switched off again on exit"
    weighted = load_vlm(str(FAMILY_SPECS["llava"])).model
    PostTrainingQuantization(weights=QuantSpec(bits=4)).transform(weighted)
    with pytest.raises(ValueError, match=f"calibrate_activations: {layers[0]} has a weight quantizer"):
        JointMeasure(weighted, batches, layers, spec, calibrate_activations=calibrate)


def _ptq(plan: str | None = None, **kwargs: Any) -> dict:
    """PTQ W4A8 as the study validates plans: MSE weight scales, min/max per-tensor inputs, the KV cache per token,
    the projector output, one quantizer per tensor read by several siblings."""
    dynamic = {"bits": 8, "granularity": "token", "mode": "dynamic", "symmetric": False}
    return {"class_path": "plugins.quantization.PostTrainingQuantization",
            "init_args": {"weights": {"bits": 4, "granularity": "channel", "observer": "mse"},
                          "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                          "activation_sites": [
                              {"targets": {"include": "language_model.*(k_proj|v_proj)$"}, "points": ["output"],
                               "spec": dynamic},
                              {"targets": {"include": "multi_modal_projector$", "types": ["Module"]},
                               "points": ["output"]}],
                          "shared_inputs": [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
                          "calibration_batches": 2, "plan": plan, **kwargs}}


def test_plan_check_measures_activations_as_ptq_validates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan_path = tmp_path / "plans" / "plan_avg4.json"
    config = tiny_config(tmp_path, max_steps=1, callbacks=[_ptq(str(plan_path))], limit_val_batches=1)
    sensitivity_main(["--config", str(config), "--budget_avg_bits", "4", "--bits", "2", "4", "8", "--batches", "1",
                      "--metric", "kl", "--out", str(plan_path)])
    common = ["--config", str(config), "--plans", str(plan_path), "--uniform", "4", "--skip", "2", "--batches", "2",
              "--metric", "kl"]
    floating = plan_check_main(common)
    quantized = plan_check_main([*common, "--activations", "config"])
    assert "calibrated per plan on 2 training batches" in capsys.readouterr().out
    assert floating["activations"] == "float"
    assert quantized["activations"]["calibration_batches"] == 2 and quantized["activations"]["points"] == ["input"]
    assert quantized["activations"]["quantizers"] > 0 and len(quantized["activations"]["sites"]) == 2
    for name in ("plan_avg4", "uniform_4"):
        assert quantized["rows"][name]["kl"] != pytest.approx(floating["rows"][name]["kl"], rel=1e-3)

    # The same plan validated by PTQ itself (its hooks calibrate on the trainer's training batches), then measured
    # on the batches the check read: the same KL from the float model.
    cli = make_cli(config)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    model = cli.model.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in calibration_batches(cli, 2, start=2):
            mask = batch["labels"][:, 1:] != -100
            inputs = model_inputs(batch, labels=False)
            validated = model(**inputs).logits[:, :-1][mask].float()
            with quantization_disabled(model):
                reference = model(**inputs).logits[:, :-1][mask].float()
            total += float(F.kl_div(F.log_softmax(validated, -1), F.log_softmax(reference, -1), log_target=True,
                                    reduction="sum"))
            count += int(mask.sum())
    assert count == quantized["scored_tokens"]
    assert quantized["rows"]["plan_avg4"]["kl"] == pytest.approx(total / count, rel=1e-5)


def test_plan_check_activations_misconfiguration(tmp_path: Path) -> None:
    weights_only = tiny_config(tmp_path, max_steps=1, callbacks=[_qat()], limit_val_batches=0)
    plan_path = tmp_path / "plan.json"
    sensitivity_main(["--config", str(weights_only), "--budget_avg_bits", "4", "--bits", "4", "8", "--batches", "1",
                      "--metric", "kl", "--out", str(plan_path)])
    common = ["--plans", str(plan_path), "--batches", "1", "--activations", "config"]
    with pytest.raises(SystemExit, match=r"--activations config: QuantizationAwareTraining \(qat\) quantizes no "
                                         "activations"):
        plan_check_main(["--config", str(weights_only), *common])
    bare = tiny_config(tmp_path, max_steps=1, limit_val_batches=0, name="bare.yaml")
    with pytest.raises(SystemExit, match="--activations config: the config has no quantization plugin"):
        plan_check_main(["--config", str(bare), *common])
    two = tiny_config(tmp_path, max_steps=1, limit_val_batches=0, name="two.yaml",
                      callbacks=[_ptq(), _ptq(name="ptq_vision", targets={"include": "vision_tower"})])
    with pytest.raises(SystemExit, match=r"--activations config: the config has 2 quantization plugins \(ptq, "
                                         r"ptq_vision\)"):
        plan_check_main(["--config", str(two), *common])
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        plan_check_main(["--config", str(weights_only), "--plans", str(plan_path), "--activations", "int8"])


def test_calibration_batches_are_shaped_as_training_batches(tmp_path: Path) -> None:
    """With ``pad_to_max_length`` training pads every batch to ``max_length``; batches drawn for measuring must too."""
    from helpers import TINY_DATA

    data = {**TINY_DATA, "init_args": {**TINY_DATA["init_args"], "pad_to_max_length": True}}
    cli = make_cli(tiny_config(tmp_path, max_steps=1, data=data))
    lengths = {batch["input_ids"].shape[1] for batch in calibration_batches(cli, 2)}
    assert lengths == {cli.datamodule.max_length}
    unpadded = make_cli(tiny_config(tmp_path, max_steps=1, name="unpadded.yaml"))
    assert all(b["input_ids"].shape[1] < unpadded.datamodule.max_length for b in calibration_batches(unpadded, 2))
