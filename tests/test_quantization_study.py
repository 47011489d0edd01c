"""The quantization study's runs are built from arguments the plugins accept (the study itself runs on a GPU)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from framework.selection import ModuleSelection
from plugins.quantization.config import ActivationSite, QuantSpec


def _study(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("quantization_study", ROOT / "experiments" / "quantization_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    opts = Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), base_export=None, base_steps=10,
                     qat_steps=20, qat_lr=1e-4, lora_steps=20, lora_lr=2e-4, ft_batch=8, parallel=1, workers=0,
                     base_workers=0, base_args="", smoke=True, rerun=False, gpus=1, sensitivity_metric="kl", sensitivity_batches=8,
                     mixed_ptq_only=False, mixed_bits=[2, 3, 4, 8], sensitivity_context_bits=None,
                     base_config=str(ROOT / "experiments" / "pretrain" / "gpu_base.yaml"),
                     settings=["w8a8", "w4a8", "w4a16", "w2a8"], granularities=["ch", "g32"],
                     stack_scopes=list(module.STACK_SCOPES),  # every scope, so a new one is built by the tests
                     stack_distill=False, stack_teacher="base", stack_feature_weight=0.0,
                     stack_sparsity_scope=None, stack_ramp_end=0.7, stack_activation_bits=8,
                     lora_float_base="base", qlora_bases=["bnb_nf4", "bnb_int8"])
    return module.Study(opts)


def _site(value: dict[str, Any]) -> ActivationSite:
    spec = value.get("spec")
    return ActivationSite(targets=ModuleSelection(**value["targets"]), points=value.get("points", ["output"]),
                          spec=None if spec is None else QuantSpec(**spec))


def _instantiate(callback: dict[str, Any]) -> Any:
    """The callback as the CLI would build it: selections and specs typed, then the class's own checks."""
    module_name, class_name = callback["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    args = dict(callback["init_args"])
    for key in ("targets",):
        if key in args:
            args[key] = ModuleSelection(**args[key])
    for key in ("weights", "activations"):
        if isinstance(args.get(key), dict):
            args[key] = QuantSpec(**args[key])
    if "activation_sites" in args:
        args["activation_sites"] = [_site(site) for site in args["activation_sites"]]
    return cls(**args)  # raises on a misspelt or out-of-range argument


def _fake_exports(study: Any) -> None:
    """What the jobs that depend on earlier stages read: the QAT W4A8 encodings and the sensitivity plans."""
    study.qat_w4a8.mkdir(parents=True, exist_ok=True)
    (study.qat_w4a8 / "qat.encodings").write_text(json.dumps({"version": "0.6.1"}))
    study.plans.mkdir(parents=True, exist_ok=True)
    for budget in (3, 4, 5):
        study.plan_path(budget).write_text("{}")


def test_every_run_has_a_unique_name_and_valid_plugin_arguments(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fake_exports(study)
    jobs = (study.table_jobs() + study.lora_fit_jobs() + study.lora_ptq_jobs() + study.mixed_jobs()
            + study.stacked_jobs())
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    reference = study.float_finetune_job()
    assert reference.verb == "fit" and reference.export_to == study.float_finetune and reference.name not in names
    qat_rows = [job for job in jobs if job.name.startswith("qat_")]
    assert qat_rows and all(job.callbacks[0]["init_args"]["float_reference"] == str(study.float_finetune)
                            for job in qat_rows)
    assert {"float", "ptq_w4a8_ch", "qat_w2a8_g32", "qat_w4a16_ch", "lora_float_autofill",
            "lora_float_ptq_w4a8_caption", "lora_qat_ptq_w4a8_autofill", "qalft_caption", "mixed_avg3",
            "mixed_avg5", "qat_uniform_w3a8_ch", "ptq_mixed_avg3", "ptq_uniform_w5a8_ch",
            "stacked_ramp75_qat_w4a8", "stacked_whole_ramp75_qat_w4a8",
            "stacked_whole_dense_head_ramp75_qat_w4a8"} <= set(names)
    kinds = set()
    for job in jobs:
        assert job.verb in ("fit", "validate")
        plugins = []
        for callback in job.callbacks:
            if callback["init_args"].get("plan"):
                # A plan is read against the model at transform; the constructor only records it.
                assert Path(callback["init_args"]["plan"]).name.startswith("plan_avg")
            plugins.append(_instantiate(callback))
        kinds |= {type(p).__name__ for p in plugins}
        if job.verb == "fit" and any(type(p).__name__ == "QuantizationAwareTraining" for p in plugins):
            assert job.export_to is not None  # encodings and bits per weight come from the export
        if job.name.startswith(("lora_", "qalft_")):
            tasks = [o for o in job.overrides if o.startswith("--data.init_args.tasks=")]
            assert len(tasks) == 1 and list(json.loads(tasks[0].split("=", 1)[1])) == [job.name.rsplit("_", 1)[1]]
    assert {"QuantizationAwareTraining", "PostTrainingQuantization", "QALFT", "SparsityRamp"} <= kinds


def test_table_rows_use_the_settings_they_are_named_after(tmp_path: Path) -> None:
    study = _study(tmp_path)
    for job in study.table_jobs():
        if job.name == "float":
            assert not job.callbacks
            continue
        args = job.callbacks[0]["init_args"]
        method, setting, granularity = job.name.split("_")
        bits, act_bits = (int(x) for x in setting.removeprefix("w").split("a"))
        assert (job.verb, args["weights"]["bits"], args["activations"]["bits"]) == (
            "fit" if method == "qat" else "validate", bits, act_bits)
        assert args["weights"]["symmetric"] and args["activations"]["granularity"] == "tensor"
        assert args["weights"]["granularity"] == ("channel" if granularity == "ch" else "group")



def test_qalft_at_another_width_names_its_runs(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.qalft_setting = "w2a8"
    names = {job.name for job in study.lora_fit_jobs() + study.lora_ptq_jobs()}
    assert study.qat_w4a8.name == "qat_w2a8_ch"
    assert {"lora_float_autofill", "lora_qat_w2a8_caption", "qalft_w2a8_autofill",
            "lora_float_ptq_w2a8_caption", "lora_qat_w2a8_ptq_w2a8_autofill"} <= names
    ptq = next(job for job in study.lora_ptq_jobs() if job.name == "lora_float_ptq_w2a8_autofill")
    assert ptq.callbacks[0]["init_args"]["weights"]["bits"] == 2
    qalft = next(job for job in study.lora_fit_jobs() if job.name == "qalft_w2a8_caption")
    assert qalft.callbacks[0]["init_args"]["encodings"].endswith("qat_w2a8_ch/qat.encodings")


def test_qalft_alone_first_runs_the_qat_export_it_starts_from(tmp_path: Path, monkeypatch: Any) -> None:
    """Without the table stage, `qalft` runs the float fine-tune and the one QAT job whose encodings it needs."""
    module = type(_study(tmp_path))
    ran: list[str] = []

    def run(self: Any, job: Any) -> int:
        ran.append(job.name)
        return 0

    def run_all(self: Any, jobs: list, parallel: int) -> dict[str, int]:
        for job in jobs:
            ran.append(job.name)
            if job.export_to == self.qat_w4a8:  # what the QAT job leaves behind
                job.export_to.mkdir(parents=True, exist_ok=True)
                (job.export_to / "qat.encodings").write_text("{}")
        return {job.name: 0 for job in jobs}

    monkeypatch.setattr(module, "run", run)
    monkeypatch.setattr(module, "run_all", run_all)
    monkeypatch.setattr(module, "merge_adapters", lambda self: 0)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    main = sys.modules["quantization_study"].main
    main(["qalft", "--smoke", "--base_export", str(base), "--out", str(tmp_path / "out"),
          "--work", str(tmp_path / "work")])
    assert ran[:2] == ["float_finetune", "qat_w4a8_ch"]
    assert {"lora_float_autofill", "qalft_caption", "lora_float_ptq_w4a8_caption"} <= set(ran)


def test_qalft_against_the_base_skips_the_float_finetune(tmp_path: Path, monkeypatch: Any) -> None:
    """`--qat_reference base`: the QAT export QALFT starts from measures agreement against the base, so the chain
    base -> QAT -> LoRA has no float fine-tune in front of it."""
    module = type(_study(tmp_path))
    ran: list[Any] = []

    def run_all(self: Any, jobs: list, parallel: int) -> dict[str, int]:
        for job in jobs:
            ran.append(job)
            if job.export_to == self.qat_w4a8:
                job.export_to.mkdir(parents=True, exist_ok=True)
                (job.export_to / "qat.encodings").write_text("{}")
        return {job.name: 0 for job in jobs}

    monkeypatch.setattr(module, "run", lambda self, job: ran.append(job) or 0)
    monkeypatch.setattr(module, "run_all", run_all)
    monkeypatch.setattr(module, "merge_adapters", lambda self: 0)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    sys.modules["quantization_study"].main(["qalft", "--smoke", "--base_export", str(base), "--qat_reference", "base",
                                            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert ran[0].name == "qat_w4a8_ch" and "float_finetune" not in [job.name for job in ran]
    qat = next(cb for cb in ran[0].callbacks if cb["class_path"].endswith("QuantizationAwareTraining"))
    assert Path(qat["init_args"]["float_reference"]) == base.resolve()


@pytest.mark.parametrize("metric", ["loss", "kl"])
def test_sensitivity_stage_passes_its_metric(metric: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study(tmp_path)
    study.opts.sensitivity_metric, study.opts.smoke, study.opts.sensitivity_batches = metric, False, 16
    calls = []
    monkeypatch.setattr(study, "python", lambda name, args: calls.append(args) or 0)
    assert study.sensitivity() == 0
    (args,) = calls
    assert args[args.index("--metric") + 1] == metric and args[args.index("--batches") + 1] == "16"
    assert args[args.index("--bits") + 1:args.index("--pareto")] == ["2", "3", "4", "8"]
    assert "--context_bits" not in args
    study.opts.sensitivity_context_bits, study.opts.rerun = 4, True
    study.sensitivity()
    assert calls[-1][calls[-1].index("--context_bits") + 1] == "4"
    assert "--refine_evaluations" not in calls[-1]
    study.opts.mixed_refine_evaluations = 60
    study.sensitivity()
    assert calls[-1][calls[-1].index("--refine_evaluations") + 1] == "60" and "--refine_metric" not in calls[-1]
    study.opts.mixed_refine_metric = "disagreement"
    study.sensitivity()
    assert calls[-1][calls[-1].index("--refine_metric") + 1] == "disagreement" and "--refine_batches" not in calls[-1]
    study.opts.mixed_refine_batches = 32
    study.sensitivity()
    assert calls[-1][calls[-1].index("--refine_batches") + 1] == "32" and "--refine_held_out" not in calls[-1]
    study.opts.mixed_refine_held_out = 16
    study.sensitivity()
    assert calls[-1][calls[-1].index("--refine_held_out") + 1] == "16"
    # The table quantizes weights as the runs that use its plans do: QAT's, or with PTQ only PTQ's MSE scales.
    (config,) = [arg for arg in calls[-1] if str(arg).endswith("sensitivity.yaml")]
    (plugin,) = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    assert plugin["class_path"].endswith("QuantizationAwareTraining") and "observer" not in plugin["init_args"]["weights"]
    study.opts.mixed_ptq_only = True
    study.sensitivity()
    (plugin,) = yaml.safe_load(Path(config).read_text())["trainer"]["callbacks"]
    assert plugin["class_path"].endswith("PostTrainingQuantization") and plugin["init_args"]["weights"] == {
        "bits": 4, "symmetric": True, "granularity": "channel", "observer": "mse"}
    # The overhead bench measures QAT whatever the mixed stage validates with.
    assert study.overhead() == 0
    (plugin,) = yaml.safe_load((study.work / "configs" / "overhead_qat_w4a8.yaml").read_text())["trainer"]["callbacks"]
    assert plugin["class_path"].endswith("QuantizationAwareTraining")
    # Plans that exist already are not measured again, and still land beside the results that use them.
    study.opts.rerun = False
    study.plans.mkdir(parents=True, exist_ok=True)
    for budget in (3, 4, 5):
        study.plan_path(budget).write_text("{}")
    count = len(calls)
    assert study.sensitivity() == 0 and len(calls) == count
    assert all((study.out / f"plan_avg{budget}.json").exists() for budget in (3, 4, 5))


def test_mixed_stage_ptq_only_drops_the_fine_tunes(tmp_path: Path) -> None:
    study = _study(tmp_path)
    _fake_exports(study)
    full = {job.name for job in study.mixed_jobs()}
    study.opts.mixed_ptq_only = True
    ptq = {job.name for job in study.mixed_jobs()}
    assert ptq == {name for name in full if name.startswith("ptq_")} and "ptq_uniform_w4a8_ch" in ptq
    assert {"mixed_avg4", "qat_uniform_w3a8_ch"} <= full - ptq


def test_ptq_only_table_has_no_fine_tunes(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.ptq_only = True
    jobs = study.table_jobs()
    assert {job.verb for job in jobs} == {"validate"}
    assert sorted(job.name for job in jobs) == sorted(["float"] + [f"ptq_{s}_{g}" for s in ("w8a8", "w4a8", "w4a16", "w2a8")
                                                                   for g in ("ch", "g32")])


def test_whole_model_stacks_cover_every_table_and_layer(tmp_path: Path) -> None:
    import torch.nn as nn
    from conftest import FAMILY_SPECS

    from framework.models import load_vlm

    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    jobs = {job.name: job for job in _study(tmp_path).stacked_jobs()}
    weights = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    for name, pruned_head, scope in (("stacked_whole_ramp75_qat_w4a8", True, "layer"),
                                     ("stacked_whole_dense_head_ramp75_qat_w4a8", False, "layer"),
                                     ("stacked_whole_dense_head_global_ramp75_qat_w4a8", False, "global"),
                                     ("stacked_whole_dense_tables_ramp75_qat_w4a8", None, "layer"),
                                     ("stacked_whole_dense_head_rows_ramp75_qat_w4a8", False, "row")):
        assert jobs[name].callbacks[0]["init_args"]["scope"] == scope
        ramp, qat = (ModuleSelection(**c["init_args"]["targets"]) for c in jobs[name].callbacks)
        pruned = {n for n, m in model.named_modules() if ramp.matches(n, m)}
        quantized = {n for n, m in model.named_modules() if qat.matches(n, m)}
        assert quantized == weights - {"model.vision_tower.embeddings.position_embedding"}
        dense = {"lm_head", "model.language_model.embed_tokens"} if pruned_head is None else \
            set() if pruned_head else {"lm_head"}
        assert pruned == quantized - dense
    # Two rankings: the Linear layers layer-wide, the table per row, by two ramps with their own names.
    table_rows = jobs["stacked_whole_dense_head_table_rows_ramp75_qat_w4a8"].callbacks
    linears, table, qat = (_instantiate(c) for c in table_rows)
    assert (linears.scope, table.scope, linears.name, table.name) == ("layer", "row", "sparsity", "sparsity_1")
    pruned = [{n for n, m in model.named_modules() if ModuleSelection(**c["init_args"]["targets"]).matches(n, m)}
              for c in table_rows[:2]]
    assert pruned[1] == {"model.language_model.embed_tokens"} and not pruned[0] & pruned[1]
    assert pruned[0] | pruned[1] == weights - {"model.vision_tower.embeddings.position_embedding", "lm_head"}


def test_stacked_runs_can_distil_from_the_float_base(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.stack_distill = True
    jobs = {job.name: job for job in study.stacked_jobs()}
    assert set(jobs) == {"stacked_ramp75_qat_w4a8_distill", "stacked_whole_ramp75_qat_w4a8_distill",
                         "stacked_whole_dense_head_ramp75_qat_w4a8_distill",
                         "stacked_whole_dense_head_global_ramp75_qat_w4a8_distill",
                         "stacked_whole_dense_tables_ramp75_qat_w4a8_distill",
                         "stacked_whole_dense_head_rows_ramp75_qat_w4a8_distill",
                         "stacked_whole_dense_head_table_rows_ramp75_qat_w4a8_distill",
                         "stacked_whole_vision50_text80_qat_w4a8_distill",
                         "stacked_whole_vision50_text78_qat_w4a8_distill",
                         "stacked_whole_vision40_text80_qat_w4a8_distill",
                         "stacked_whole_vision40_text80_patches_qat_w4a8_distill",
                         "stacked_whole_dense_vision_text80_patches_qat_w4a8_distill",
                         "stacked_whole_dense_vision_text79_patches_qat_w4a8_distill"}
    # A scope with its own sparsity per ramp: each ramp gets its share, under its own state key.
    ramps = [cb["init_args"] for cb in jobs["stacked_whole_vision50_text80_qat_w4a8_distill"].callbacks
             if cb["class_path"].endswith("SparsityRamp")]
    assert [(r["final_sparsity"], r["scope"], r["name"]) for r in ramps] == [
        (0.8, "layer", "sparsity"), (0.8, "row", "sparsity_1"), (0.5, "layer", "sparsity_2")]
    for scope, text, vision in (("whole_vision50_text78", 0.78, 0.5), ("whole_vision40_text80", 0.8, 0.4)):
        ramps = [cb["init_args"] for cb in jobs[f"stacked_{scope}_qat_w4a8_distill"].callbacks
                 if cb["class_path"].endswith("SparsityRamp")]
        assert [r["final_sparsity"] for r in ramps] == [text, text, vision]
    # The _patches scopes quantize the patch convolution as well; the dense-vision one prunes only the text tower.
    for scope in ("whole_vision40_text80_patches", "whole_dense_vision_text80_patches",
                  "whole_dense_vision_text79_patches"):
        qat = next(cb for cb in jobs[f"stacked_{scope}_qat_w4a8_distill"].callbacks
                   if cb["class_path"].endswith("QuantizationAwareTraining"))
        assert qat["init_args"]["targets"]["types"] == ["Linear", "Embedding", "Conv2d"]
    ramps = [cb["init_args"]["final_sparsity"] for cb in jobs[
        "stacked_whole_dense_vision_text80_patches_qat_w4a8_distill"].callbacks if cb["class_path"].endswith("Ramp")]
    assert ramps == [0.8, 0.8]
    ramps = [cb["init_args"]["final_sparsity"] for cb in jobs[
        "stacked_whole_dense_vision_text79_patches_qat_w4a8_distill"].callbacks if cb["class_path"].endswith("Ramp")]
    assert ramps == [0.79, 0.79]
    for job in jobs.values():
        distill = _instantiate(job.callbacks[-1])
        assert type(distill).__name__ == "Distillation"
        assert job.callbacks[-1]["init_args"]["teacher"] == str(study.base_export)
        assert job.export_to.name == job.name


def test_stacked_runs_can_distil_from_the_float_finetune(tmp_path: Path, monkeypatch: Any) -> None:
    """`--stack_teacher float_finetune`: the teacher is the float fine-tune, trained first even where agreement is
    measured against the base."""
    module = type(_study(tmp_path))
    ran: list[Any] = []

    def run(self: Any, job: Any) -> int:
        ran.append([job.name])
        job.export_to.mkdir(parents=True, exist_ok=True)
        (job.export_to / "config.json").write_text("{}")
        return 0

    monkeypatch.setattr(module, "run", run)
    monkeypatch.setattr(module, "run_all", lambda self, jobs, parallel: ran.append(jobs) or {j.name: 0 for j in jobs})
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    sys.modules["quantization_study"].main(
        ["stacked", "--smoke", "--base_export", str(base), "--out", str(tmp_path / "out"), "--work",
         str(tmp_path / "work"), "--qat_reference", "base", "--stack_scopes", "whole_vision50_text80",
         "--stack_distill", "--stack_teacher", "float_finetune"])
    assert ran[0] == ["float_finetune"]
    (job,) = ran[1]
    assert job.name == "stacked_whole_vision50_text80_qat_w4a8_distill_ft"
    teacher = job.callbacks[-1]["init_args"]["teacher"]
    assert Path(teacher) == (tmp_path / "work" / "exports" / "float_finetune").resolve()
    qat = next(cb for cb in job.callbacks if cb["class_path"].endswith("QuantizationAwareTraining"))
    assert Path(qat["init_args"]["float_reference"]) == base.resolve()
    with pytest.raises(SystemExit):  # a teacher without distillation is a mistake, not a no-op
        sys.modules["quantization_study"].main(["stacked", "--smoke", "--base_export", str(base), "--stack_teacher",
                                                "float_finetune"])
    with pytest.raises(SystemExit):  # so is a layer-wise weight
        sys.modules["quantization_study"].main(["stacked", "--smoke", "--base_export", str(base),
                                                "--stack_feature_weight", "1"])


def test_stacked_runs_can_distil_hidden_states_too(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.stack_distill, study.opts.stack_feature_weight = True, 0.5
    study.opts.stack_scopes = ["whole_vision50_text80"]
    assert study.feature_layers() == [-1]  # no readable base config
    study.base_export.mkdir(parents=True, exist_ok=True)
    (study.base_export / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 12}}))
    (job,) = study.stacked_jobs()
    assert job.name == "stacked_whole_vision50_text80_qat_w4a8_distill_features"
    distill = job.callbacks[-1]["init_args"]
    assert distill["feature_weight"] == 0.5 and distill["feature_layers"] == [4, 8, -1]
    _instantiate(job.callbacks[-1])


def test_float_lora_can_start_from_the_float_finetune(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.lora_float_base = "float_finetune"
    fits = {job.name: job for job in study.lora_fit_jobs()}
    assert {"lora_float_ft_autofill", "lora_float_ft_caption"} <= set(fits) and "lora_float_autofill" not in fits
    assert f"--model.init_args.model={study.float_finetune}" in fits["lora_float_ft_caption"].overrides
    assert f"--model.init_args.model={study.qat_w4a8}" in fits["lora_qat_caption"].overrides
    ptq = {job.name for job in study.lora_ptq_jobs()}
    assert {"lora_float_ft_ptq_w4a8_autofill", "lora_qat_ptq_w4a8_caption"} <= ptq


def test_qlora_runs_start_where_float_lora_starts_on_a_bitsandbytes_base(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.lora_float_base = "float_finetune"
    fits = {job.name: job for job in study.lora_fit_jobs()}
    for kind in ("nf4", "int8"):
        job = fits[f"qlora_{kind}_caption"]
        assert job.callbacks[0]["init_args"]["base"] == f"bnb_{kind}"
        assert f"--model.init_args.model={study.float_finetune}" in job.overrides
        assert study.task_only("caption") in job.overrides
    study.opts.qlora_bases = []
    assert not any(name.startswith("qlora_") for name in (job.name for job in study.lora_fit_jobs()))


def test_float_lora_start_trains_beside_the_qat_run_when_qat_does_not_need_it(tmp_path: Path, monkeypatch: Any) -> None:
    module = type(_study(tmp_path))
    batches: list[list[str]] = []

    def run_all(self, jobs, parallel):  # noqa: ANN001, ANN202
        batches.append([job.name for job in jobs])
        for job in jobs:
            if job.export_to is not None:
                job.export_to.mkdir(parents=True, exist_ok=True)
                (job.export_to / "config.json").write_text("{}")
                (job.export_to / "qat.encodings").write_text("{}")
        return dict.fromkeys(batches[-1], 0)

    monkeypatch.setattr(module, "run", lambda self, job: batches.append([job.name]) or 0)
    monkeypatch.setattr(module, "run_all", run_all)
    monkeypatch.setattr(module, "merge_adapters", lambda self: 0)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    main = sys.modules["quantization_study"].main
    common = ["qalft", "--smoke", "--base_export", str(base), "--out", str(tmp_path / "out"), "--lora_float_base",
              "float_finetune"]
    main([*common, "--qat_reference", "base", "--work", str(tmp_path / "beside")])
    assert batches[0] == ["qat_w4a8_ch", "float_finetune"]
    # QAT rows measured against the float fine-tune need it first.
    batches.clear()
    main([*common, "--work", str(tmp_path / "first")])
    assert batches[0] == ["float_finetune"] and batches[1] == ["qat_w4a8_ch"]


def test_a_failed_run_fails_the_study_after_every_stage_ran(tmp_path: Path, monkeypatch: Any) -> None:
    module = type(_study(tmp_path))
    monkeypatch.setattr(module, "run", lambda self, job: 0)
    monkeypatch.setattr(module, "run_all", lambda self, jobs, parallel: {job.name: int("whole" in job.name)
                                                                         for job in jobs})
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    main = sys.modules["quantization_study"].main
    with pytest.raises(SystemExit, match="failed runs: stacked_whole_ramp75_qat_w4a8"):
        main(["stacked", "collect", "--smoke", "--stack_scopes", "language_model", "whole", "--base_export", str(base),
              "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    status = json.loads((tmp_path / "out" / "study_status.json").read_text())
    assert status["codes"]["stacked_whole_ramp75_qat_w4a8"] == 1 and status["codes"]["stacked_ramp75_qat_w4a8"] == 0


def test_stacked_runs_take_another_ramp_end_in_their_names(tmp_path: Path) -> None:
    study = _study(tmp_path)
    default = {job.name: job for job in study.stacked_jobs()}
    assert all(c["init_args"]["end"] == 0.7 for job in default.values() for c in job.callbacks if "end" in c["init_args"])
    study.opts.stack_ramp_end = 0.5
    jobs = {job.name: job for job in study.stacked_jobs()}
    assert {"stacked_ramp75_end50_qat_w4a8", "stacked_whole_vision50_text80_end50_qat_w4a8"} <= set(jobs)
    ramps = [c for job in jobs.values() for c in job.callbacks if c["class_path"] == "plugins.sparsity.SparsityRamp"]
    assert ramps and all(c["init_args"]["end"] == 0.5 for c in ramps)
    with pytest.raises(SystemExit):
        sys.modules["quantization_study"].main(["stacked", "--smoke", "--stack_ramp_end", "0", "--base_export",
                                                str(tmp_path)])


def test_stacked_runs_take_16_bit_activations_in_their_names(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.stack_activation_bits = 16
    jobs = {job.name: job for job in study.stacked_jobs()}
    assert {"stacked_ramp75_qat_w4a16", "stacked_whole_dense_vision_text80_patches_qat_w4a16"} <= set(jobs)
    for job in jobs.values():
        (qat,) = [c["init_args"] for c in job.callbacks if c["class_path"] == "plugins.quantization.QuantizationAwareTraining"]
        assert qat["weights"]["bits"] == 4 and qat["activations"]["bits"] == 16
        assert all(site.get("spec") is None or site["spec"]["bits"] == 16 for site in qat["activation_sites"])
    with pytest.raises(SystemExit):
        sys.modules["quantization_study"].main(["stacked", "--smoke", "--stack_activation_bits", "4",
                                                "--base_export", str(tmp_path)])


def test_stacked_runs_take_another_sparsity_ranking_in_their_names(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.stack_sparsity_scope = "row"
    jobs = {job.name: job for job in study.stacked_jobs()}
    assert {"stacked_row_ramp75_qat_w4a8", "stacked_whole_dense_tables_row_ramp75_qat_w4a8",
            "stacked_whole_dense_head_rows_ramp75_qat_w4a8"} <= set(jobs)  # already row: unchanged
    assert all(job.callbacks[0]["init_args"]["scope"] == "row" for job in jobs.values())


def test_stacked_seed_replicas_come_with_a_float_fine_tune_of_their_seed(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path)
    study.opts.stack_scopes, study.opts.stack_distill = ["whole_vision40_text80"], True
    (stack,) = study.stacked_jobs()
    study.opts.stack_seeds = [1, 2]
    jobs = {job.name: job for job in study.stacked_jobs()}
    assert set(jobs) == {stack.name, *(f"{name}_seed{seed}" for name in (stack.name, "float_finetune")
                                       for seed in (1, 2))}
    for seed in (1, 2):
        flags = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
        replica, reference = jobs[f"{stack.name}_seed{seed}"], jobs[f"float_finetune_seed{seed}"]
        # The same plugins (teacher included) and training, another seed; neither is exported.
        assert replica.callbacks == stack.callbacks and replica.overrides == [*stack.overrides, *flags]
        assert reference.callbacks == [] and reference.overrides == [*study.float_finetune_job().overrides, *flags]
        assert replica.export_to is None and reference.export_to is None
    for wrong in (["0"], ["1", "1"]):  # 0 is the runs' own seed; a repeat would run one replica twice
        with pytest.raises(SystemExit):
            sys.modules["quantization_study"].main(["stacked", "--smoke", "--base_export", str(tmp_path),
                                                    "--stack_seeds", *wrong])
        assert "--stack_seeds: distinct seeds >= 1" in capsys.readouterr().err


def test_run_tag_names_the_float_fine_tune_and_the_stacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path)
    study.opts.stack_scopes, study.opts.stack_distill, study.opts.stack_teacher = ["whole_vision50_text80"], True, \
        "float_finetune"
    study.opts.run_tag = "1000steps_lr2e-4"
    float_finetune = study.float_finetune_job()
    assert float_finetune.name == "float_finetune_1000steps_lr2e-4" == float_finetune.export_to.name
    (stack,) = study.stacked_jobs()
    assert stack.name == "stacked_whole_vision50_text80_qat_w4a8_distill_ft_1000steps_lr2e-4"
    # The stack learns from and is measured against the fine-tune of its own length, not the default one.
    teacher = next(c for c in stack.callbacks if c["class_path"].endswith("Distillation"))["init_args"]["teacher"]
    qat = next(c for c in stack.callbacks if c["class_path"].endswith("QuantizationAwareTraining"))
    assert teacher == str(float_finetune.export_to) == qat["init_args"]["float_reference"]
    study.opts.stack_seeds = [1]
    assert {job.name for job in study.stacked_jobs()} >= {f"{stack.name}_seed1", "float_finetune_1000steps_lr2e-4_seed1"}
    with pytest.raises(SystemExit):
        sys.modules["quantization_study"].main(["stacked", "--smoke", "--base_export", str(tmp_path), "--run_tag", "a/b"])
    assert "--run_tag: letters, digits" in capsys.readouterr().err


def test_size_stage_packs_each_stack_before_training_it(tmp_path: Path) -> None:
    """`size`: each scope's whole-model bits per weight from a one-shot pruned and rounded base, exported and packed
    as a trained stack is; the 4-bit patch convolution leaves only norms, biases and position embeddings at 16 bits."""
    _study(tmp_path)  # loads the module
    out = tmp_path / "out"
    sys.modules["quantization_study"].main(
        ["size", "--smoke", "--stack_scopes", "whole_vision40_text80", "whole_vision40_text80_patches",
         "--out", str(out), "--work", str(tmp_path / "work")])
    sizes = json.loads((out / "stack_size.json").read_text())
    plain, patches = sizes["whole_vision40_text80"], sizes["whole_vision40_text80_patches"]
    assert plain["source"].endswith("llava-test.json")  # no base export: the spec's initial weights
    assert "patches" in patches["parts"] and "patches" not in plain["parts"]
    assert patches["rest_parameters"] == plain["rest_parameters"] - patches["parts"]["patches"]["parameters"]
    assert patches["model_bits_per_weight"] < plain["model_bits_per_weight"] < 16
    assert plain["parts"]["text linears"]["bits_per_weight"] < plain["parts"]["vision tower"]["bits_per_weight"]
    # The spec's initial weights are seeded: a second sizing gives the same figures.
    sys.modules["quantization_study"].main(
        ["size", "--smoke", "--stack_scopes", "whole_vision40_text80", "--out", str(tmp_path / "again"),
         "--work", str(tmp_path / "work")])
    assert json.loads((tmp_path / "again" / "stack_size.json").read_text())["whole_vision40_text80"] == plain
    # A base named but not there is an error, not a silent fall back to the spec.
    with pytest.raises(SystemExit, match=r"size: --base_export .*missing holds no exported model"):
        sys.modules["quantization_study"].main(["size", "--smoke", "--base_export", str(tmp_path / "missing"),
                                                "--out", str(out), "--work", str(tmp_path / "work")])
