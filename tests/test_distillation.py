"""Distillation: KL to a frozen teacher as a loss term, stacked with a compression plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SPECS
from helpers import fit_straight_and_resumed, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.export import export_model
from framework.losses import answer_distillation_kl
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
        folder = tmp_path / name
        folder.mkdir()
        cli = make_cli(tiny_config(folder, spec=str(dense), max_steps=10, callbacks=callbacks, **NO_VAL),
                       "--model.init_args.lr=0.01")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        weight = cli.model.model.get_submodule("model.language_model.layers.0.mlp.down_proj").weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)  # the ramp did its part
        kls[name] = _kl_to_teacher(cli.model.model, dense)
        if name == "ramp_distill":
            assert torch.isfinite(cli.trainer.callback_metrics["compression/distillation/kl"])
            assert "compression/distillation/loss_kl" in cli.trainer.callback_metrics
    assert kls["ramp_distill"] < 0.8 * kls["ramp"], kls


def test_resume_matches_the_uninterrupted_run(dense: Path, tmp_path: Path) -> None:
    callbacks = [RAMP, _distill(dense, weight=2.0, temperature=2.0)]
    runs = fit_straight_and_resumed(
        tmp_path, lambda folder: tiny_config(folder, spec=str(dense), max_steps=8, callbacks=callbacks, **NO_VAL))
    states = {name: model_state(cli.model) for name, cli in runs.items()}
    assert states["straight"].keys() == states["resumed"].keys()
    for key, value in states["straight"].items():
        torch.testing.assert_close(states["resumed"][key], value, rtol=0, atol=1e-6, msg=key)
    plugin = next(c for c in runs["resumed"].trainer.callbacks if isinstance(c, Distillation))
    other = Distillation(teacher=str(dense), weight=3.0, temperature=2.0)
    with pytest.raises(ValueError, match=r"another distillation configuration \(weight: checkpoint 2.0, config 3.0\)"):
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
    config = tiny_config(tmp_path, spec=str(dense), max_steps=10, callbacks=[l0, _distill(dense, temperature=2.0)],
                         **NO_VAL)
    cli = make_cli(config, "--model.init_args.lr=0.01")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["compression/distillation/kl"]) and metrics["compression/distillation/kl"] > 0
    assert metrics["compression/l0_pruning/fractional_gates"] == 0.0
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    summary = json.loads((tmp_path / "export" / "vlmc_export.json").read_text())["plugins"]["l0_pruning"]["summary"]
    assert summary["removed_fraction"] == pytest.approx(0.5, abs=0.05)
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    assert sum(p.numel() for p in exported.parameters()) == summary["params_after"]
    teacher = AutoModelForImageTextToText.from_pretrained(dense)
    assert summary["params_after"] < sum(p.numel() for p in teacher.parameters())
