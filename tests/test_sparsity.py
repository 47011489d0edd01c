"""Sparsity plugins: misconfiguration, schedules, exact masks, exact zeros, resume, one-shot baselines, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import FAMILY_SPECS
from helpers import StopAt, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.export import export_model
from framework.models import load_vlm
from framework.plugin import PluginConflictError
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from framework.storage import load_packed, load_unpacked
from plugins.sparsity import (
    InputNormStats,
    OneShotPruning,
    SparsityRamp,
    follows_nm,
    nm_masks,
    scheduled_sparsity,
    unstructured_masks,
    weight_mask_of,
    weight_score,
)
from plugins.sparsity.layer import fold_stats, kth_smallest, lowest_k, lowest_share_each, sparsity_of

RAMP = "plugins.sparsity.SparsityRamp"
ONESHOT = "plugins.sparsity.OneShotPruning"
NO_VAL = {"limit_val_batches": 0}


def _plugin(cli, cls: type = SparsityRamp):  # noqa: ANN001, ANN202
    return next(c for c in cli.trainer.callbacks if isinstance(c, cls))


def _fit(tmp_path: Path, callbacks: list[dict], *extra: str, max_steps: int = 8, **kwargs):  # noqa: ANN003, ANN202
    cli = make_cli(tiny_config(tmp_path, max_steps=max_steps, callbacks=callbacks, **{**NO_VAL, **kwargs}), *extra)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def _assert_masked_weights_are_zero(plugin) -> None:  # noqa: ANN001
    for name, layer in plugin.layers.items():
        mask = weight_mask_of(layer)
        assert (layer.weight[~mask] == 0).all(), f"{name}: a pruned weight moved away from zero"


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SparsityRamp, {"final_sparsity": 1.0}, r"SparsityRamp.final_sparsity: must be in \[0, 1\)"),
        (SparsityRamp, {"final_sparsity": -0.1}, r"SparsityRamp.final_sparsity: must be in \[0, 1\)"),
        (SparsityRamp, {"final_sparsity": 0.5, "initial_sparsity": 0.6}, r"initial_sparsity: must be in \[0, final"),
        (SparsityRamp, {"pattern": "4:2"}, r"SparsityRamp.pattern: N:M needs positive integers with N < M"),
        (SparsityRamp, {"pattern": "2:2"}, r"SparsityRamp.pattern: N:M needs .* N < M"),
        (SparsityRamp, {"pattern": "3:0"}, r"SparsityRamp.pattern: N:M needs positive"),
        (SparsityRamp, {"pattern": "0:4"}, r"SparsityRamp.pattern: N:M needs positive"),
        (SparsityRamp, {"pattern": "two-four"}, r"SparsityRamp.pattern: must be 'unstructured' or 'N:M'"),
        (SparsityRamp, {"pattern": "2:4", "final_sparsity": 0.7}, r"final_sparsity: pattern 2:4 implies sparsity 0.5"),
        (SparsityRamp, {"start": 0.5, "end": 0.5}, r"SparsityRamp.end: must be after start"),
        (SparsityRamp, {"start": 0.6, "end": 0.2}, r"SparsityRamp.end: must be after start"),
        (SparsityRamp, {"start": 1.0}, r"SparsityRamp.start: must be a fraction of training in \[0, 1\)"),
        (SparsityRamp, {"end": 1.5}, r"SparsityRamp.end: must be a fraction of training in \(0, 1\]"),
        (SparsityRamp, {"start_step": 10, "end_step": 5}, r"SparsityRamp.end_step: must be after start_step \(10\)"),
        (SparsityRamp, {"start_step": -1}, r"SparsityRamp.start_step: must be >= 0"),
        (SparsityRamp, {"update_every": 0}, r"SparsityRamp.update_every: must be an integer >= 1"),
        (SparsityRamp, {"schedule": "exponential"}, r"SparsityRamp.schedule: must be one of 'cubic', 'linear'"),
        (SparsityRamp, {"score": "gradient"}, r"SparsityRamp.score: must be one of 'magnitude', 'activation'"),
        (SparsityRamp, {"stats_steps": 0}, r"SparsityRamp.stats_steps: must be an integer >= 1 or null"),
        (SparsityRamp, {"scope": "model"}, r"SparsityRamp.scope: must be one of 'layer', 'row', 'global'"),
        (SparsityRamp, {"scope": "row", "pattern": "2:4"}, r"SparsityRamp.scope: 'row' ranks within each output row"),
        (OneShotPruning, {"scope": "row", "pattern": "4:8"}, r"OneShotPruning.scope: 'row' ranks within"),
        (OneShotPruning, {"sparsity": 1.0}, r"OneShotPruning.sparsity: must be in \[0, 1\)"),
        (OneShotPruning, {"method": "sparsegpt"}, r"OneShotPruning.method: must be one of 'magnitude', 'activation'"),
        (OneShotPruning, {"pattern": "5:4"}, r"OneShotPruning.pattern: N:M needs"),
        (OneShotPruning, {"calibration_batches": 0}, r"OneShotPruning.calibration_batches: must be an integer >= 1"),
    ],
)
def test_misconfiguration_fails_in_init(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_model_dependent_checks_fail_in_transform() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    with pytest.raises(ValueError, match=r"ramp.pattern: model.language_model.layers.0.self_attn.q_proj has 32 inputs, "
                                         r"not divisible by M=5"):
        SparsityRamp(pattern="2:5", name="ramp").transform(model)
    with pytest.raises(ValueError, match="ramp.targets: include='nothing_here' .* matched no module"):
        SparsityRamp(targets=ModuleSelection(include="nothing_here"), name="ramp").transform(model)
    with pytest.raises(ValueError, match="oneshot_pruning.targets: .* matched no module"):
        OneShotPruning(targets=ModuleSelection(include="nothing_here")).transform(model)


def test_end_before_start_in_steps_fails_at_fit_start(tmp_path: Path) -> None:
    cli = make_cli(tiny_config(tmp_path, max_steps=10, callbacks=[
        {"class_path": RAMP, "init_args": {"start_step": 8, "end": 0.5}}], **NO_VAL))
    with pytest.raises(ValueError, match=r"sparsity: the ramp ends at step 5 .* starts at step 8"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0
    assert SparsityRamp(end_step=11).resolve_steps(20) == (0, 11)
    with pytest.raises(ValueError, match=r"sparsity.end_step: 30 is after the last step \(20\)"):
        SparsityRamp(end_step=30).resolve_steps(20)


# ---------------------------------------------------------------------------------------------- pure torch
def test_schedule_values() -> None:
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - progress)^3 between start (10) and end (30).
    assert scheduled_sparsity(5, 10, 30, 0.1, 0.9, "cubic") == 0.0  # before the start: dense
    assert scheduled_sparsity(10, 10, 30, 0.1, 0.9, "cubic") == pytest.approx(0.1)
    assert scheduled_sparsity(20, 10, 30, 0.1, 0.9, "cubic") == pytest.approx(0.9 - 0.8 * 0.125)
    assert scheduled_sparsity(25, 10, 30, 0.0, 0.8, "cubic") == pytest.approx(0.8 - 0.8 * 0.25 ** 3)
    assert scheduled_sparsity(30, 10, 30, 0.1, 0.9, "cubic") == pytest.approx(0.9)
    assert scheduled_sparsity(99, 10, 30, 0.1, 0.9, "cubic") == pytest.approx(0.9)
    assert scheduled_sparsity(20, 10, 30, 0.1, 0.9, "linear") == pytest.approx(0.5)
    assert scheduled_sparsity(15, 10, 30, 0.0, 0.8, "linear") == pytest.approx(0.2)
    # The cubic ramp prunes faster early than the linear one and meets it at both ends.
    assert scheduled_sparsity(15, 10, 30, 0.0, 0.8, "cubic") > scheduled_sparsity(15, 10, 30, 0.0, 0.8, "linear")
    ramp = SparsityRamp(final_sparsity=0.8, start=0.25, end=0.75, schedule="linear")
    ramp._start, ramp._end = ramp.resolve_steps(40)
    assert (ramp._start, ramp._end) == (10, 30)
    assert ramp.target_at(20) == pytest.approx(0.4)


@pytest.mark.parametrize("by_sort", [False, True])
def test_same_shape_layers_ranked_together_match_one_at_a_time(by_sort: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped ranking (one sort per shape, split into batches) picks exactly what ranking each tensor alone picks,
    ties included (already-pruned zeros, repeated values)."""
    import plugins.sparsity.layer as layer_module

    original = layer_module.kth_smallest
    monkeypatch.setattr(layer_module, "kth_smallest", lambda v, k, by_sort_=None: original(v, k, by_sort))
    monkeypatch.setattr(layer_module, "_RANK_BATCH_ELEMENTS", 2 * 16 * 32)  # two tensors per batch: splits
    torch.manual_seed(0)
    tensors = {f"a{i}": torch.randint(0, 7, (16, 32)).float() for i in range(5)}
    tensors |= {"b": torch.rand(8, 64), "c": torch.zeros(4, 8), "d": torch.rand(3, 5)}
    for share in (0.0, 0.3, 0.7, 1.0):
        grouped = lowest_share_each(tensors, share)
        assert list(grouped) == list(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(grouped[name], lowest_k(tensor, round(share * tensor.numel()))), (name, share)


def test_masks_have_exact_counts_and_nm_structure() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.rand(16, 32), "b": 10 * torch.rand(8, 64)}
    layer = unstructured_masks(scores, 0.7)
    assert all(int((~m).sum()) == round(0.7 * m.numel()) for m in layer.values())
    glob = unstructured_masks(scores, 0.7, scope="global")
    assert sum(int((~m).sum()) for m in glob.values()) == round(0.7 * (16 * 32 + 8 * 64))
    # Normalised scores: the layer with 10x larger weights is not spared wholesale.
    assert 0.5 < (~glob["b"]).float().mean() < 0.9
    # Ties (already-pruned zeros) still give exact counts.
    assert int(lowest_k(torch.zeros(10), 3).sum()) == 3
    # The GPU's sort-based threshold picks the same value as kthvalue, ties included.
    values = torch.randint(0, 50, (4000,)).float()
    for k in (1, 17, 2000, 4000):
        assert kth_smallest(values, k, by_sort=True) == kth_smallest(values, k, by_sort=False)
    assert sparsity_of([~layer["a"], layer["b"]]) == (int(layer["a"].sum()) + int((~layer["b"]).sum())) / (16 * 32 + 8 * 64)
    for n, m in [(2, 4), (4, 8), (1, 4)]:
        full = nm_masks(scores, n, m)
        for mask in full.values():
            assert follows_nm(mask, n, m) and (mask.reshape(-1, m).sum(-1) == n).all()
        half = nm_masks(scores, n, m, fraction=0.5)
        for name, mask in half.items():
            groups = mask.reshape(-1, m).sum(-1)
            assert int((groups == n).sum()) == round(0.5 * groups.numel()) and set(groups.tolist()) <= {n, m}
            assert (mask | ~full[name]).all(), "a group pruned early already holds its final N:M choice"
    with pytest.raises(ValueError, match="input dimension 32 is not divisible by M=5"):
        nm_masks({"a": torch.rand(4, 32)}, 2, 5)


def test_activation_score_spares_the_loud_input_channel() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    stats = InputNormStats.attach(linear)
    stats.enabled = True
    x = torch.randn(64, 8)
    x[:, 3] *= 100.0
    linear(x)
    fold_stats([linear])
    assert int(linear.input_count) == 64
    torch.testing.assert_close(linear.input_sq_mean, x.pow(2).mean(0))
    with torch.no_grad():
        linear.weight[:, 3] = 1e-2  # the smallest weights, on the loudest channel
    magnitude = unstructured_masks({"l": weight_score(linear.weight)}, 0.5)["l"]
    activation = unstructured_masks({"l": weight_score(linear.weight, linear.input_sq_mean)}, 0.5)["l"]
    assert not magnitude[:, 3].any() and activation[:, 3].all()
    linear.eval()  # eval-mode forwards (validation, generation) do not count
    linear(x)
    assert stats.pending_count == 0


# ---------------------------------------------------------------------------------------------- fits
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_fit_reaches_target_exactly(tmp_path: Path, scope: str) -> None:
    """Dense for two steps (AdamW momentum builds up), then pruned by the ramp with weight decay on."""
    ramp = {"class_path": RAMP, "init_args": {"final_sparsity": 0.7, "start_step": 2, "end_step": 6,
                                              "update_every": 2, "scope": scope}}
    cli = _fit(tmp_path, [ramp], "--model.init_args.weight_decay=0.5", max_steps=8)
    plugin = _plugin(cli)
    masks = plugin.masks()
    if scope == "layer":
        for name, mask in masks.items():
            assert int((~mask).sum()) == round(0.7 * mask.numel()), name
    else:
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total)
        assert len({round(float((~m).float().mean()), 3) for m in masks.values()}) > 1, "global: layers differ"
    _assert_masked_weights_are_zero(plugin)
    summary = plugin.summary(cli.model.model)
    assert summary["sparsity"] == pytest.approx(0.7, abs=1e-4) and summary["target_sparsity"] == 0.7
    assert summary["layers"] == 14 and summary["pattern"] == "unstructured" and summary["last_update_step"] == 6
    logged = cli.trainer.callback_metrics
    assert float(logged["compression/sparsity/target_sparsity"]) == pytest.approx(0.7)
    assert float(logged["compression/sparsity/sparsity"]) == pytest.approx(0.7, abs=1e-4)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert sum(k.endswith("weight_mask") for k in state["state_dict"]) == 14
    saved = state["callbacks"]["SparsityRamp[sparsity]"]
    assert saved["last_update_step"] == 6 and json.loads(saved["config"])["scope"] == scope


def test_exact_zeros_through_optimizer_steps_with_weight_decay(tmp_path: Path) -> None:
    oneshot = {"class_path": ONESHOT, "init_args": {"sparsity": 0.6}}
    cli = make_cli(tiny_config(tmp_path, max_steps=5, callbacks=[oneshot], **NO_VAL),
                   "--model.init_args.weight_decay=1.0", "--model.init_args.lr=0.05")
    before = {k: v for k, v in model_state(cli.model).items() if k.endswith(".weight")}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = _plugin(cli, OneShotPruning)
    _assert_masked_weights_are_zero(plugin)
    name, layer = next(iter(plugin.layers.items()))
    kept = weight_mask_of(layer)
    assert not torch.equal(layer.weight[kept], before[f"{name}.weight"][kept]), "kept weights train"
    # The optimizer did hold momentum for the pruned weights' neighbours; the pruned ones got none.
    exp_avg = cli.trainer.optimizers[0].state[layer.weight]["exp_avg"]
    assert (exp_avg[~kept] == 0).all() and (exp_avg[kept] != 0).any()


def test_activation_score_gathers_statistics_and_changes_masks(tmp_path: Path) -> None:
    masks = {}
    for score in ("magnitude", "activation"):
        ramp = {"class_path": RAMP, "init_args": {"final_sparsity": 0.5, "start_step": 3, "end_step": 4,
                                                  "score": score}}
        (tmp_path / score).mkdir()
        cli = _fit(tmp_path / score, [ramp], max_steps=4)
        plugin = _plugin(cli)
        masks[score] = plugin.masks()
        if score == "activation":
            for layer in plugin.layers.values():
                assert int(layer.input_count) > 0 and (layer.input_sq_mean > 0).all()
            state = torch.load(tmp_path / score / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
            assert sum(k.endswith("input_sq_mean") for k in state) == 14
    changed = sum(int((masks["magnitude"][n] != masks["activation"][n]).sum()) for n in masks["magnitude"])
    assert changed > 0


@pytest.mark.parametrize(("stats_steps", "measured"), [
    (1, [4, 9, 14, 19]),             # the step before each update (5, 10, 15, 20)
    (2, [3, 4, 8, 9, 13, 14, 18, 19]),
    (None, list(range(20))),          # every step up to the end of the ramp
])
def test_activation_statistics_come_from_the_steps_before_each_update(stats_steps: int | None,
                                                                      measured: list[int]) -> None:
    ramp = SparsityRamp(final_sparsity=0.5, start_step=0, end_step=20, update_every=5, score="activation",
                        stats_steps=stats_steps)
    ramp._start, ramp._end = 0, 20
    assert [step for step in range(30) if ramp._collecting(step)] == measured


def test_resume_mid_ramp_matches_uninterrupted_run(tmp_path: Path) -> None:
    ramp = {"class_path": RAMP, "init_args": {"final_sparsity": 0.6, "start": 0.1, "end": 0.8, "update_every": 2,
                                              "score": "activation", "scope": "global"}}
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = _fit(straight_dir, [ramp], max_steps=10)

    interrupted = make_cli(tiny_config(resumed_dir, max_steps=10, callbacks=[ramp], **NO_VAL))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    mid = _plugin(interrupted)
    assert interrupted.trainer.global_step == 4 and 0 < mid.sparsity < 0.6, "stopped mid-ramp"

    resumed = make_cli(tiny_config(resumed_dir, max_steps=10, callbacks=[ramp], **NO_VAL))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule,
                        ckpt_path=str(resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"))
    want, got = model_state(straight.model), model_state(resumed.model)
    assert want.keys() == got.keys() and any(k.endswith("weight_mask") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert _plugin(resumed).last_update_step == _plugin(straight).last_update_step == 8

    other = SparsityRamp(final_sparsity=0.6, start=0.1, end=0.8, update_every=3, score="activation", scope="global")
    with pytest.raises(ValueError, match="another sparsity configuration .*update_every: checkpoint 2, config 3"):
        other.load_state_dict(_plugin(straight).state_dict())


def test_nm_ramp_on_qwen_and_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForImageTextToText

    # Positions: NVIDIA's 2:4 layout (the default, auto, would pick the smaller enumerative coding).
    ramp = {"class_path": RAMP, "init_args": {"pattern": "2:4", "start_step": 0, "end_step": 4, "update_every": 2,
                                              "schedule": "linear", "index_coding": "positions"}}
    config = tiny_config(tmp_path, spec=str(FAMILY_SPECS["qwen2_vl"]), max_steps=6, callbacks=[ramp], **NO_VAL)
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = _plugin(cli)
    for name, layer in plugin.layers.items():
        assert follows_nm(weight_mask_of(layer), 2, 4) and follows_nm(layer.weight, 2, 4), name
        assert float((~weight_mask_of(layer)).float().mean()) == 0.5
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    assert "exported to" in capsys.readouterr().out
    packed = load_packed(tmp_path / "export" / "sparsity.safetensors")
    assert {(p.format, p.meta["index_coding"]) for p in packed.values()} == {("nm", "positions")}
    assert len(packed) == len(plugin.layers)
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").state_dict()
    for key, value in load_unpacked(tmp_path / "export" / "sparsity.safetensors").items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0)
    report = json.loads((tmp_path / "export" / "sparsity_bpv.json").read_text())
    # 2:4 in float32: per group of 4, two 32-bit values and two 2-bit indices, i.e. 16 + 1 bits per element.
    assert report["summary"]["bpv"] == pytest.approx(17.0) and report["pattern"] == "2:4"


def test_one_shot_via_fit(tmp_path: Path) -> None:
    for method in ("magnitude", "activation"):
        (tmp_path / method).mkdir()
        oneshot = {"class_path": ONESHOT, "init_args": {"method": method, "sparsity": 0.5, "calibration_batches": 2}}
        cli = _fit(tmp_path / method, [oneshot], max_steps=3)
        plugin = _plugin(cli, OneShotPruning)
        assert plugin.pruned and plugin.sparsity == 0.5
        for layer in plugin.layers.values():
            assert int((~weight_mask_of(layer)).sum()) == layer.weight.numel() // 2
            assert getattr(layer, "input_sq_mean", None) is None, "calibration statistics are not kept"
        _assert_masked_weights_are_zero(plugin)
        assert cli.datamodule.state_dict()["next_position"] == 3, "calibration does not consume training batches"


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_one_shot_via_validate(tmp_path: Path, method: str, capsys: pytest.CaptureFixture) -> None:
    oneshot = {"class_path": ONESHOT, "init_args": {"method": method, "pattern": "2:4", "scope": "global",
                                                    "calibration_batches": 2}}
    config = tiny_config(tmp_path, callbacks=[oneshot])
    main(["validate", "--config", str(config)])
    assert "val/autofill" in capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    result = summary["plugins"]["oneshot_pruning"]
    assert result["sparsity"] == 0.5 and result["pattern"] == "2:4" and result["pruned"] == 1
    assert result["score"] == method
    assert "val/loss" in summary["metrics"]


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_export_round_trip_and_bpv(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForImageTextToText

    loaded = load_vlm(str(FAMILY_SPECS[family]))
    plugin = SparsityRamp(final_sparsity=0.75, scope="global")
    plugin.transform(loaded.model)
    plugin.update_masks(0.75)
    loaded.model.eval()
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    batch = processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[0]])
    masked_logits = loaded.model(**batch).logits
    out = export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    exported = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("weight_mask" in k for k in exported.state_dict())
    torch.testing.assert_close(exported(**batch).logits, masked_logits, rtol=1e-5, atol=1e-5)
    baked = exported.state_dict()
    unpacked = load_unpacked(out / "sparsity.safetensors")
    assert set(unpacked) == {f"{n}.weight" for n in plugin.layers}
    for key, value in unpacked.items():
        assert value.dtype == baked[key].dtype
        torch.testing.assert_close(value, baked[key], rtol=0, atol=0)
    report = json.loads((out / "sparsity_bpv.json").read_text())
    total = report["summary"]
    assert total["sparsity"] == pytest.approx(0.75, abs=1e-3) and len(report["layers"]) == len(plugin.layers)
    # float32 values at 75% sparsity: about 0.25 * 32 + (mask <= 1 bit) = 9 bits, far under 32.
    assert total["bpv"] < total["bitmask_bound"] + 1e-9 and total["bpv"] < 0.5 * total["value_bits"]
    assert total["bpv"] >= total["entropy_floor"] - 0.05
    whole = report["model"]  # the rest of the model (embeddings, vision tower, ...) at 16 bits
    assert whole["packed_parameters"] == total["numel"] < whole["parameters"]
    assert whole["parameters"] == sum(p.numel() for p in exported.parameters())
    manifest = json.loads((out / "vlmc_export.json").read_text())
    assert manifest["plugins"]["sparsity"]["files"] == ["sparsity.safetensors", "sparsity_bpv.json"]
    assert all(weight_mask_of(m) is not None for m in plugin.layers.values()), "export works on a copy"


# ---------------------------------------------------------------------------------------------- stacking
def test_stacks_with_channel_ablation_on_disjoint_layers(tmp_path: Path) -> None:
    callbacks = [
        {"class_path": RAMP, "init_args": {"final_sparsity": 0.5, "start_step": 0, "end_step": 2,
                                           "targets": {"include": r"language_model.*mlp"}}},
        {"class_path": "plugins.channel_ablation.ChannelAblation",
         "init_args": {"fraction": 0.25, "targets": {"include": r"language_model.*self_attn"}}},
        {"class_path": ONESHOT, "init_args": {"sparsity": 0.5, "targets": {"include": "vision_tower"}}},
    ]
    cli = _fit(tmp_path, callbacks, max_steps=3)
    metrics = cli.trainer.callback_metrics
    assert float(metrics["compression/sparsity/sparsity"]) == pytest.approx(0.5)
    assert float(metrics["compression/oneshot_pruning/sparsity"]) == pytest.approx(0.5)
    assert metrics["compression/channel_ablation/zeroed_fraction"] == pytest.approx(0.25, abs=0.03)


def test_two_sparsity_plugins_on_one_layer_fail_at_startup(tmp_path: Path) -> None:
    callbacks = [{"class_path": RAMP, "init_args": {"name": "a"}},
                 {"class_path": RAMP, "init_args": {"name": "b", "targets": {"include": r"language_model.*mlp"}}}]
    cli = make_cli(tiny_config(tmp_path, max_steps=3, callbacks=callbacks, **NO_VAL))
    with pytest.raises(PluginConflictError, match=r"'a' \(SparsityRamp\) and 'b' \(SparsityRamp\) both rewrite .*mlp"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0
    mixed = [{"class_path": RAMP, "init_args": {}}, {"class_path": ONESHOT, "init_args": {}}]
    cli = make_cli(tiny_config(tmp_path, max_steps=3, callbacks=mixed, name="mixed.yaml", **NO_VAL))
    with pytest.raises(PluginConflictError, match="both rewrite"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.mark.parametrize(("pattern", "index_coding", "expected", "mask_bits"), [
    ("2:4", "positions", ("nm", "positions"), 1.0),
    ("2:4", "auto", ("nm", "enumerative"), 0.66),
    ("4:8", "positions", ("nm", "positions"), 1.5),
    ("4:8", "auto", ("nm", "enumerative"), 0.79),
])
def test_nm_export_index_codings(pattern: str, index_coding: str, expected: tuple[str, str], mask_bits: float) -> None:
    from framework.storage import bpv_row, unpack
    from plugins.sparsity.config import Pattern
    from plugins.sparsity.export import pack_sparse_weights

    n, m = map(int, pattern.split(":"))
    weight = torch.randn(16, 512)
    groups = weight.view(16, -1, m)
    drop = groups.abs().argsort(dim=-1)[..., : m - n]  # the m-n smallest of each group
    weight = groups.scatter(-1, drop, 0.0).view(16, 512)
    packed = pack_sparse_weights({"w": weight}, Pattern(n=n, m=m), index_coding)["w"]
    assert (packed.format, packed.meta["index_coding"]) == expected
    assert torch.equal(unpack(packed), weight)
    row = bpv_row("w", packed)
    # Positions: 2 bits per kept value at 2:4 (ties with the bitmask), 3 at 4:8 (worse than it). Enumerative: within
    # 2% of the pattern entropy log2(C(m, n)) / m, below the 1-bit mask.
    assert row["bpv"] - 0.5 * 32 == pytest.approx(mask_bits, abs=0.01)
    assert row["bpv"] - 0.5 * 32 >= row["index_floor"]
    with pytest.raises(ValueError, match="index_coding: must be one of"):
        pack_sparse_weights({"w": weight}, Pattern(n=n, m=m), "huffman")


# ---------------------------------------------------------------------------------------------- token embeddings
def test_embedding_table_is_pruned_by_magnitude_and_stays_zero(tmp_path: Path) -> None:
    table = {"include": "embed_tokens", "types": ["Embedding"]}
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    with pytest.raises(ValueError, match=r"ramp.targets: model.language_model.embed_tokens is an Embedding; "
                                         r"activation-aware scores need a Linear's inputs"):
        SparsityRamp(targets=ModuleSelection(**table), score="activation", name="ramp").transform(model)
    with pytest.raises(ValueError, match="oneshot_pruning.targets: .*embed_tokens is an Embedding"):
        OneShotPruning(targets=ModuleSelection(**table), method="activation").transform(model)
    with pytest.raises(ValueError, match=r"ramp.targets: .*layer_norm1 is a LayerNorm, expected Linear \(or Embedding"):
        SparsityRamp(targets=ModuleSelection(include="layer_norm1", types=["LayerNorm"]), name="ramp").transform(model)
    ramp = {"class_path": RAMP, "init_args": {"final_sparsity": 0.75, "start_step": 0, "end_step": 4,
                                              "update_every": 2, "targets": table}}
    cli = _fit(tmp_path, [ramp], "--model.init_args.weight_decay=0.5", max_steps=6)
    plugin = _plugin(cli)
    (mask,) = plugin.masks().values()
    assert int((~mask).sum()) == round(0.75 * mask.numel())
    _assert_masked_weights_are_zero(plugin)
    embed = cli.model.model.get_input_embeddings()
    ids = torch.arange(embed.num_embeddings)
    assert (embed(ids)[~mask] == 0).all(), "a pruned entry is looked up as zero"


def test_a_tied_table_is_masked_and_packed_once(tmp_path: Path) -> None:
    from conftest import ROOT

    loaded = load_vlm(str(ROOT / "experiments" / "models" / "llava-tiny.json"))  # tied input and output tables
    model = loaded.model
    ramp = SparsityRamp(final_sparsity=0.75, targets=ModuleSelection(include="embed_tokens|lm_head",
                                                                     types=["Linear", "Embedding"]))
    ramp.transform(model)
    assert list(ramp.layers) == ["model.language_model.embed_tokens"]
    ramp.update_masks(0.75)
    assert float((model.lm_head.weight == 0).float().mean()) >= 0.75  # the head reads the same, pruned tensor
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [ramp])
    report = json.loads((out / "sparsity_bpv.json").read_text())
    assert [row["name"] for row in report["layers"]] == ["model.language_model.embed_tokens.weight"]
    assert report["model"]["parameters"] == sum(p.numel() for p in load_vlm(str(out)).model.parameters())


def test_row_scope_prunes_every_output_row_exactly(tmp_path: Path) -> None:
    """Wanda's comparison group: each output row (each token of a table) loses exactly its share, through a ramp."""
    targets = {"include": "language_model", "exclude": "lm_head", "types": ["Linear", "Embedding"]}
    ramp = {"class_path": RAMP, "init_args": {"final_sparsity": 0.75, "start_step": 0, "end_step": 4,
                                              "update_every": 2, "scope": "row", "targets": targets}}
    cli = _fit(tmp_path, [ramp], max_steps=6)
    plugin = _plugin(cli)
    assert "model.language_model.embed_tokens" in plugin.layers
    for name, mask in plugin.masks().items():
        pruned = (~mask).sum(dim=1)
        assert torch.all(pruned == round(0.75 * mask.shape[1])), name
    _assert_masked_weights_are_zero(plugin)
    assert plugin.summary(cli.model.model)["scope"] == "row"
