"""Distillation: KL to a frozen teacher as a loss term, stacked with a compression plugin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILY_SPECS
from helpers import fit_straight_and_resumed, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.export import export_model
from framework.losses import answer_distillation_kl, answer_positions, relative_feature_error
from framework.models import load_vlm
from framework.module import training_inputs
from framework.processing import VLMProcessor, family_for
from plugins.distillation import Distillation

NO_VAL = {"limit_val_batches": 0}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA exported once: the student starts from it and the teacher is it (seeded: the same model
    whichever test runs first)."""
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    return export_model(loaded.model, loaded.tokenizer, loaded.image_processor,
                        tmp_path_factory.mktemp("distill") / "dense", [])


def _batch(loaded) -> dict:
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    return processor.encode([make_task("caption", image_size=32)[0], make_task("autofill", image_size=32)[1]])


def _distill(teacher: Path | str, **init_args: object) -> dict:
    return {"class_path": "plugins.distillation.Distillation", "init_args": {"teacher": str(teacher), **init_args}}


RAMP = {"class_path": "plugins.sparsity.SparsityRamp",
        "init_args": {"final_sparsity": 0.5, "start": 0.0, "end": 0.5, "update_every": 1,
                      "targets": {"include": "language_model", "exclude": "lm_head"}}}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"teacher": ""}, r"distillation.teacher: must be a model folder"),
    ({"teacher": "x", "weight": 0.0}, r"distillation.weight: must be > 0"),
    ({"teacher": "x", "temperature": -1.0}, r"distillation.temperature: must be > 0"),
    ({"teacher": "x", "feature_weight": -0.5}, r"distillation.feature_weight: must be >= 0"),
    ({"teacher": "x", "feature_weight": float("nan")}, r"distillation.feature_weight: must be >= 0"),
    ({"teacher": "x", "feature_layers": []}, r"distillation.feature_layers: must be distinct hidden-state indices"),
    ({"teacher": "x", "feature_layers": [1, 1]}, r"distillation.feature_layers: must be distinct"),
    ({"teacher": "x", "feature_layers": ["last"]}, r"distillation.feature_layers: must be distinct"),
])
def test_misconfiguration_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Distillation(**kwargs)


def test_teacher_problems_fail_at_start_up(tmp_path: Path) -> None:
    student = load_vlm(str(FAMILY_SPECS["llava"])).model
    with pytest.raises(FileNotFoundError, match=r"distillation.teacher: .*missing"):
        Distillation(teacher=str(tmp_path / "missing")).teacher(student)
    with pytest.raises(ValueError, match=r"distillation.teacher: .* is a Qwen2VLForConditionalGeneration, the "
                                         r"student a LlavaForConditionalGeneration"):
        Distillation(teacher=str(FAMILY_SPECS["qwen2_vl"])).teacher(student)
    # In a run: before the first step.
    cli = make_cli(tiny_config(tmp_path, max_steps=4, callbacks=[_distill(tmp_path / "missing")], **NO_VAL))
    with pytest.raises(FileNotFoundError, match=r"distillation.teacher: .*missing"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_term_is_zero_for_the_teacher_itself_and_positive_once_it_differs(dense: Path) -> None:
    loaded = load_vlm(str(dense))
    student = loaded.model.train()
    plugin = Distillation(teacher=str(dense), temperature=2.0)
    plugin.teacher(student)
    parameters_before = {n for n, _ in student.named_parameters()}
    batch = _batch(loaded)
    outputs = student(**training_inputs(batch))
    assert float(plugin.loss_terms(student, batch, outputs)["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert {n for n, _ in student.named_parameters()} == parameters_before  # the teacher is not a submodule
    with torch.no_grad():
        student.lm_head.weight.mul_(0.5)
    outputs = student(**training_inputs(batch))
    kl = plugin.loss_terms(student, batch, outputs)["kl"]
    assert kl > 1e-4 and kl.requires_grad
    kl.backward()
    assert student.lm_head.weight.grad is not None
    assert all(p.grad is None for p in plugin.teacher(student).parameters())


def test_feature_term_is_zero_for_the_teacher_itself_and_trains_the_layers_that_differ(dense: Path) -> None:
    loaded = load_vlm(str(dense))
    student = loaded.model.train()
    plugin = Distillation(teacher=str(dense), feature_weight=2.0, feature_layers=[1, -1])
    assert plugin.needs_hidden_states and not Distillation(teacher=str(dense)).needs_hidden_states
    plugin.check_features(student, plugin.teacher(student))
    batch = _batch(loaded)
    outputs = student(**training_inputs(batch), output_hidden_states=True)
    terms = plugin.loss_terms(student, batch, outputs)
    assert set(terms) == {"kl", "features"} and float(terms["features"]) == pytest.approx(0.0, abs=1e-6)
    layer = student.get_submodule("model.language_model.layers.0.mlp.down_proj")
    with torch.no_grad():
        layer.weight.mul_(3.0)
    outputs = student(**training_inputs(batch), output_hidden_states=True)
    features = plugin.loss_terms(student, batch, outputs)["features"]
    assert features > 1e-3 and features.requires_grad
    features.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # The step's outputs must carry the hidden states the term reads.
    with pytest.raises(RuntimeError, match=r"distillation: the training step's outputs hold no hidden_states"):
        plugin.loss_terms(student, batch, student(**training_inputs(batch)))


def test_feature_layers_and_widths_are_checked_at_start_up(dense: Path, tmp_path: Path) -> None:
    cli = make_cli(tiny_config(tmp_path, spec=str(dense), max_steps=4,
                               callbacks=[_distill(dense, feature_weight=1.0, feature_layers=[0, 3])], **NO_VAL))
    with pytest.raises(ValueError, match=r"distillation.feature_layers: \[3\] outside the student's 3 hidden "
                                         r"states \(indices -3..2\)"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0
    spec = json.loads(FAMILY_SPECS["llava"].read_text())
    spec["hf_config"]["text_config"].update(hidden_size=48)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps(spec))
    student = load_vlm(str(dense)).model
    plugin = Distillation(teacher=str(wider), feature_weight=1.0)
    with pytest.raises(ValueError, match=r"distillation.feature_weight: the student's hidden size is 32, the "
                                         r"teacher's 48"):
        plugin.check_features(student, plugin.teacher(student))


def _fit_with_ramp(dense: Path, folder: Path, callbacks: list[dict]) -> Any:
    """A 10-step fit from the dense model in ``folder`` with ``callbacks`` (RAMP among them), checked to have reached
    the ramp's 50%."""
    folder.mkdir()
    cli = make_cli(tiny_config(folder, spec=str(dense), max_steps=10, callbacks=callbacks, **NO_VAL),
                   "--model.init_args.lr=0.01")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    weight = cli.model.model.get_submodule("model.language_model.layers.0.mlp.down_proj").weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)  # the ramp did its part
    return cli


def _feature_error_to_teacher(model: torch.nn.Module, teacher: Path) -> float:
    loaded = load_vlm(str(teacher))
    batch = _batch(loaded)
    with torch.no_grad():
        inputs = {**training_inputs(batch), "output_hidden_states": True}
        student, reference = model.eval()(**inputs).hidden_states, loaded.model.eval()(**inputs).hidden_states
    span, mask = answer_positions(batch, batch["input_ids"].shape[1])
    return sum(float(relative_feature_error(s[:, span], t[:, span], mask)) for s, t in zip(student[1:], reference[1:]))


def test_stacked_with_a_sparsity_ramp_feature_distillation_keeps_the_hidden_states_closer(dense: Path,
                                                                                        tmp_path: Path) -> None:
    errors = {}
    for name, callbacks in (("kl", [RAMP, _distill(dense, weight=1.0)]),
                            ("kl_features", [RAMP, _distill(dense, weight=1.0, feature_weight=5.0,
                                                            feature_layers=[1, 2])])):
        cli = _fit_with_ramp(dense, tmp_path / name, callbacks)
        metrics = cli.trainer.callback_metrics
        assert ("compression/distillation/feature_error" in metrics) == (name == "kl_features")
        errors[name] = _feature_error_to_teacher(cli.model.model, dense)
    assert errors["kl_features"] < 0.8 * errors["kl"], errors


def _kl_to_teacher(model: torch.nn.Module, teacher: Path) -> float:
    loaded = load_vlm(str(teacher))
    batch = _batch(loaded)
    with torch.no_grad():
        inputs = training_inputs(batch)
        return float(answer_distillation_kl(model.eval()(**inputs).logits, loaded.model.eval()(**inputs).logits,
                                            batch))


def test_stacked_with_a_sparsity_ramp_the_student_stays_closer_to_the_teacher(dense: Path, tmp_path: Path) -> None:
    kls = {}
    for name, callbacks in (("ramp", [RAMP]), ("ramp_distill", [RAMP, _distill(dense, weight=5.0)])):
        cli = _fit_with_ramp(dense, tmp_path / name, callbacks)
        kls[name] = _kl_to_teacher(cli.model.model, dense)
        if name == "ramp_distill":
            assert torch.isfinite(cli.trainer.callback_metrics["compression/distillation/kl"])
            assert "compression/distillation/loss_kl" in cli.trainer.callback_metrics
    assert kls["ramp_distill"] < 0.8 * kls["ramp"], kls


def test_resume_matches_the_uninterrupted_run(dense: Path, tmp_path: Path) -> None:
    callbacks = [RAMP, _distill(dense, weight=2.0, temperature=2.0, feature_weight=1.0)]
    runs = fit_straight_and_resumed(
        tmp_path, lambda folder: tiny_config(folder, spec=str(dense), max_steps=8, callbacks=callbacks, **NO_VAL))
    states = {name: model_state(cli.model) for name, cli in runs.items()}
    assert states["straight"].keys() == states["resumed"].keys()
    for key, value in states["straight"].items():
        torch.testing.assert_close(states["resumed"][key], value, rtol=0, atol=1e-6, msg=key)
    plugin = next(c for c in runs["resumed"].trainer.callbacks if isinstance(c, Distillation))
    other = Distillation(teacher=str(dense), weight=3.0, temperature=2.0, feature_weight=1.0)
    with pytest.raises(ValueError, match=r"another distillation configuration \(weight: checkpoint 2.0, config 3.0\)"):
        other.load_state_dict(plugin.state_dict())
    other = Distillation(teacher=str(dense), weight=2.0, temperature=2.0, feature_weight=1.0, feature_layers=[1])
    with pytest.raises(ValueError, match=r"another distillation configuration \(feature_layers: checkpoint \[-1\]"):
        other.load_state_dict(plugin.state_dict())


def test_export_holds_the_student_only(dense: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, spec=str(dense), max_steps=4, callbacks=[_distill(dense)], **NO_VAL)
    cli = make_cli(config, "--model.init_args.lr=0.01")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    manifest = json.loads((tmp_path / "export" / "vlmc_export.json").read_text())
    assert not manifest["plugins"].get("distillation", {}).get("files")  # nothing of the teacher is written
    # Exporting needs the student only: the same run exports with its teacher gone.
    moved = tmp_path / "config_without_teacher.yaml"
    moved.write_text(config.read_text().replace(f"teacher: {dense}", f"teacher: {tmp_path / 'gone'}"))
    assert str(tmp_path / "gone") in moved.read_text()
    main(["export", "--config", str(moved), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export_again")])
    exported = load_vlm(str(tmp_path / "export")).model.state_dict()
    trained = cli.model.model.state_dict()
    assert exported.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)



def test_stacked_with_l0_pruning_the_pruned_export_is_the_student(dense: Path, tmp_path: Path) -> None:
    # L0 pruning recovering toward its dense model (sparsity_study's l0_50_improved_distill): the teacher is the
    # unpruned model, the student reaches L0's exact target and exports physically smaller.
    from transformers import AutoModelForImageTextToText

    l0 = {"class_path": "plugins.l0_pruning.L0Pruning",
          "init_args": {"target_fraction": 0.5, "method": "improved", "hard_from": 0.25, "target_warmup": 0.4}}
    # Layer-wise too (sparsity_study's l0_50_improved_distill_ft_features): the masked student keeps its shapes
    # while it trains, so its hidden states compare with the teacher's until the export removes the units.
    distill = _distill(dense, temperature=2.0, feature_weight=1.0, feature_layers=[1, -1])
    config = tiny_config(tmp_path, spec=str(dense), max_steps=10, callbacks=[l0, distill], **NO_VAL)
    cli = make_cli(config, "--model.init_args.lr=0.01")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["compression/distillation/kl"]) and metrics["compression/distillation/kl"] > 0
    assert 0 < metrics["compression/distillation/feature_error"] < 1
    assert metrics["compression/l0_pruning/fractional_gates"] == 0.0
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    summary = json.loads((tmp_path / "export" / "vlmc_export.json").read_text())["plugins"]["l0_pruning"]["summary"]
    assert summary["removed_fraction"] == pytest.approx(0.5, abs=0.05)
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert sum(p.numel() for p in exported.parameters()) == summary["params_after"]
    teacher = AutoModelForImageTextToText.from_pretrained(dense)
    assert summary["params_after"] < sum(p.numel() for p in teacher.parameters())
