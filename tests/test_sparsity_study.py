"""The sparsity study's runs are built from arguments the plugins accept (the study itself runs on a GPU)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import ROOT

from framework.selection import ModuleSelection


def _study(tmp_path: Path, seeds: tuple[int, ...] = ()):
    spec = importlib.util.spec_from_file_location("sparsity_study", ROOT / "experiments" / "sparsity_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    opts = Namespace(out=str(tmp_path / "out"), work=str(tmp_path / "work"), base_steps=10, ft_steps=20, l0_steps=30,
                     ft_lr=1e-4, ft_batch=8, parallel=1, workers=0, base_workers=0, base_args="", smoke=True, rerun=False, gpus=1,
                     seeds=list(seeds),
                     base_config=str(ROOT / "experiments" / "pretrain" / "gpu_base.yaml"))
    return module.Study(opts)


def test_every_run_has_a_unique_name_and_valid_plugin_arguments(tmp_path: Path) -> None:
    study = _study(tmp_path)
    assert study.feature_layers() == [-1]  # no base config to count layers in
    study.base_export.mkdir(parents=True, exist_ok=True)
    (study.base_export / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 12}}))
    jobs = study.sweep_jobs() + study.oneshot_jobs()
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    assert {"dense", "dense_finetune", "ramp75", "ramp2of4", "oneshot_act_75", "oneshot_mag_2of4",
            "l0_50_improved", "l0_90_plain", "dense_finetune_l0"} <= set(names)
    # Longest runs first: the L0 fine-tunes and their dense reference lead the pool.
    assert names[:11] == ["l0_50_improved", "l0_50_plain", "l0_90_improved", "l0_90_plain", "l0_50_improved_hard20",
                          "l0_50_improved_hard50", "l0_90_improved_hard20", "l0_50_improved_keep_hidden",
                          "l0_50_improved_keep_heads", "l0_50_improved_keep_layers", "dense_finetune_l0"]
    for job in jobs:
        for callback in job.callbacks:
            module_name, class_name = callback["class_path"].rsplit(".", 1)
            cls = getattr(importlib.import_module(module_name), class_name)
            args = dict(callback["init_args"])
            if "targets" in args:
                args["targets"] = ModuleSelection(**args["targets"])
            cls(**args)  # raises on a misspelt or out-of-range argument
        assert job.verb in ("fit", "validate")
    # The distilled L0 runs: one from the base at once, one from the L0 runs' dense reference once it is exported.
    by_name = {job.name: job for job in jobs}
    reference = by_name["dense_finetune_l0"].export_to
    assert by_name["l0_50_improved_distill"].after is None
    assert by_name["l0_50_improved_distill_ft"].after == "dense_finetune_l0" == reference.name
    teacher = by_name["l0_50_improved_distill_ft"].callbacks[1]["init_args"]["teacher"]
    assert teacher == str(reference)
    features = by_name["l0_50_improved_distill_ft_features"]
    assert features.after == "dense_finetune_l0"
    assert features.callbacks[1]["init_args"] | {"teacher": None} == {
        "teacher": None, "weight": 1.0, "temperature": 2.0, "feature_weight": 1.0, "feature_layers": [4, 8, -1]}
    # One kind of unit kept whole per run, the others left to the plugin's defaults.
    for kept in ("hidden", "heads", "layers"):
        args = by_name[f"l0_50_improved_keep_{kept}"].callbacks[0]["init_args"]
        assert args[f"prune_{kept}"] is False and args["target_fraction"] == 0.5
        assert not [key for key in args if key.startswith("prune_") and key != f"prune_{kept}"]


def test_base_arguments_reach_the_base_run_and_its_export_only(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.base_args = "--model.init_args.compile=true --data.init_args.pad_to_max_length=true"
    base = study.base_job()
    assert base.overrides[-2:] == ["--model.init_args.compile=true", "--data.init_args.pad_to_max_length=true"]
    assert not any("compile" in o for job in study.sweep_jobs() for o in job.overrides)


def test_runs_import_the_checkout_from_their_own_folders(tmp_path: Path) -> None:
    # Each run starts in a folder under --work; a checkout that is not pip-installed must still be importable there.
    # -S leaves out site-packages (where an editable install would be found), so only the study's PYTHONPATH can.
    study = _study(tmp_path)
    code = "import importlib.util as u; print(u.find_spec('framework').origin)"
    found = subprocess.run([sys.executable, "-S", "-c", code], env=study.env, cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(found) == ROOT / "framework" / "__init__.py"


def test_studies_side_by_side_keep_each_others_status(tmp_path: Path) -> None:
    # `run_gpu_studies.sh reading` starts the sweep and the L0 runs at once on one --out: neither may erase the other.
    from concurrent.futures import ThreadPoolExecutor

    _study(tmp_path)  # loads the study's module
    module = sys.modules["sparsity_study"]
    path = tmp_path / "study_status.json"
    calls = [({f"run{i}": i % 2}, [f"--only run{i}"]) for i in range(16)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda call: module.record_status(path, *call), calls))
    status = json.loads(path.read_text())
    assert status["codes"] == {f"run{i}": i % 2 for i in range(16)}
    assert len(status["invocations"]) == 16
    module.record_status(path, {"run3": 0}, ["--only run3"])  # a re-run's latest code wins
    assert json.loads(path.read_text())["codes"]["run3"] == 0


def test_collect_alone_writes_only_the_table(tmp_path: Path) -> None:
    # Collecting a committed results folder again must not leave a status file of an invocation that ran nothing.
    _study(tmp_path)
    module = sys.modules["sparsity_study"]
    out = tmp_path / "collected"
    out.mkdir()
    source = ROOT / "experiments/results/sparsity/gpu_h200x2_run21"
    for name in ("summary_ramp75_seed1.json", "summary_dense_finetune_seed1.json"):
        (out / name).write_text((source / name).read_text())
    module.main(["collect", "--out", str(out), "--work", str(tmp_path / "work")])
    rows = (out / "accuracy.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("dense_finetune_seed1,")
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.csv", "summary_dense_finetune_seed1.json",
                                                     "summary_ramp75_seed1.json"]


def test_base_argument_configs_resolve_from_where_the_study_starts(tmp_path: Path, monkeypatch) -> None:
    # Each run starts in its own folder under --work: a relative --config in --base_args must not be read from there.
    monkeypatch.chdir(ROOT)
    study = _study(tmp_path)
    study.opts.base_args = ("--config experiments/pretrain/gpu_reading.yaml --data.init_args.num_workers=28 "
                            "--config=experiments/csv_logger.yaml")
    overrides = study.base_job().overrides
    # The files first: --base_steps and --base_workers win over a recipe file's max_steps and num_workers ...
    assert overrides[:3] == ["--config", str(ROOT / "experiments/pretrain/gpu_reading.yaml"),
                             f"--config={ROOT / 'experiments/csv_logger.yaml'}"]
    assert overrides[3] == f"--trainer.max_steps={study.opts.base_steps}"
    # ... and explicit arguments of --base_args win over everything.
    assert overrides[-1] == "--data.init_args.num_workers=28"


def test_seed_replicas_pair_a_ramp_with_its_reference(tmp_path: Path) -> None:
    jobs = {job.name: job for job in _study(tmp_path, seeds=(1, 2)).sweep_jobs()}
    for name in ("dense_finetune", "ramp50", "ramp75", "ramp2of4"):
        for seed in (1, 2):
            replica = jobs[f"{name}_seed{seed}"]
            assert replica.callbacks == jobs[name].callbacks
            assert replica.overrides[-2:] == [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
            assert replica.export_to is None and replica.after is None
    assert not any(name.startswith(("ramp65_seed", "ramp2of4_distill_seed")) for name in jobs)
    # L0 and its dense reference are paired too; the gates' noise follows the seed, the other arguments do not change.
    for seed in (1, 2):
        replica = jobs[f"l0_50_improved_seed{seed}"]
        (gates,) = replica.callbacks
        assert gates["init_args"] == {**jobs["l0_50_improved"].callbacks[0]["init_args"], "seed": seed}
        assert replica.overrides[-2:] == [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
        assert jobs[f"dense_finetune_l0_seed{seed}"].overrides[-1] == f"--data.init_args.seed={seed}"
    assert jobs["l0_50_improved"].callbacks[0]["init_args"].get("seed", 0) == 0


def test_scratch_baseline_gets_the_same_compute(tmp_path: Path) -> None:
    study = _study(tmp_path)
    spec = tmp_path / "pruned.json"
    from plugins.l0_pruning.spec import main as spec_main

    spec_main(["--base", str(ROOT / "experiments/models/llava-test.json"), "--fraction", "0.5", "--out", str(spec)])
    job = study.scratch_job(spec)
    steps = int(next(o for o in job.overrides if o.startswith("--trainer.max_steps=")).split("=")[1])
    # 10 base steps at batch 4 plus 30 L0 steps at batch 8, on a model with fewer parameters: more steps.
    assert steps > 10 + 30 * 8 // 4
    alone = study.scratch_job(spec, with_base=False)
    assert alone.name == "l0_scratch50_l0compute" and alone.gpu is None
    steps_alone = int(next(o for o in alone.overrides if o.startswith("--trainer.max_steps=")).split("=")[1])
    assert 30 * 8 // 4 < steps_alone < steps  # the L0 run's compute only, on the smaller model
    # Trained like the base: the base's recipe files come first, the pruned shape and the steps override them.
    study.opts.base_args = f"--config {ROOT}/experiments/pretrain/gpu_reading.yaml --data.init_args.num_workers=28"
    reading = study.scratch_job(spec, with_base=False).overrides
    assert reading[:2] == ["--config", str(ROOT / "experiments/pretrain/gpu_reading.yaml")]
    assert reading[2] == f"--model.init_args.model={spec}" and "--data.init_args.num_workers=28" not in reading


def test_runs_take_the_least_busy_unreserved_gpu(tmp_path: Path) -> None:
    study = _study(tmp_path)
    reserved = tmp_path / "reserved"
    reserved.write_text("2 3\n")
    study.opts.gpus, study.opts.gpu_ids, study.opts.reserved_gpus = 4, None, str(reserved)
    job = study.base_job()
    job.gpu = None
    first, second, third = (study.acquire_gpu(job) for _ in range(3))
    assert (first, second, third) == (0, 1, 0)  # 2 and 3 are held by other work
    reserved.unlink()  # released: the idle ones come next
    assert study.acquire_gpu(job) == 2 and study.acquire_gpu(job) == 3
    study.release_gpu(first)
    assert study.acquire_gpu(job) == 0
    pinned = study.base_job()  # pinned to its GPU whatever the load
    assert pinned.gpu == 0 and study.acquire_gpu(pinned) == 0
    study.opts.gpu_ids = [5, 6]
    pinned.gpu = 1
    assert study.acquire_gpu(pinned) == 6
    study.opts.gpu_ids = [7]  # one named GPU: counted like any other, so releasing it balances
    only = study.acquire_gpu(study.base_job())
    assert only == 7
    study.release_gpu(only)
    study.opts.gpus, study.opts.gpu_ids = 1, None
    assert study.acquire_gpu(job) is None  # one unnamed GPU: the default device


def test_scratch_stage_trains_the_pruned_shape_without_a_base(tmp_path: Path) -> None:
    study = _study(tmp_path)
    study.opts.base_steps, study.opts.l0_steps, study.opts.ft_batch = 6, 6, 4  # what --smoke sets
    module = sys.modules["sparsity_study"]
    out, work = tmp_path / "out", tmp_path / "work"
    module.main(["scratch", "collect", "--smoke", "--out", str(out), "--work", str(work)])
    summary = json.loads((out / "summary_l0_scratch50_l0compute.json").read_text())
    job = study.scratch_job(study.scratch_spec, with_base=False)
    steps = int(next(o for o in job.overrides if o.startswith("--trainer.max_steps=")).split("=")[1])
    assert summary["global_step"] == steps > 6 * 4 // 4  # more steps than the L0 run's samples: a smaller model
    small = json.loads(study.scratch_spec.read_text())["hf_config"]["text_config"]
    dense = json.loads((ROOT / "experiments/models/llava-test.json").read_text())["hf_config"]["text_config"]
    assert small["hidden_size"] * small["intermediate_size"] < dense["hidden_size"] * dense["intermediate_size"]
    assert not (work / "exports" / "dense_base").exists()  # no base was trained
    assert "l0_scratch50_l0compute" in (out / "accuracy.csv").read_text()


def test_distillation_from_the_dense_finetune_runs_after_it(tmp_path: Path) -> None:
    study = _study(tmp_path)
    jobs = {job.name: job for job in study.sweep_jobs()}
    reference = jobs["dense_finetune"].export_to
    for name in ("ramp50_distill_ft", "ramp75_distill_ft", "ramp2of4_distill_ft"):
        teacher = next(c for c in jobs[name].callbacks if c["class_path"].endswith("Distillation"))
        assert teacher["init_args"]["teacher"] == str(reference) and jobs[name].after == "dense_finetune"
    assert jobs["ramp75_distill"].after is None  # the base is there before the sweep starts

    order = []

    def run(job):
        order.append(job.name)
        if job.name == "dense_finetune" and exports:
            (reference / "config.json").parent.mkdir(parents=True, exist_ok=True)
            (reference / "config.json").write_text("{}")
        return 0

    study.run = run
    exports = True
    codes = study.run_all(list(jobs.values()), parallel=3)
    assert all(order.index(n) > order.index("dense_finetune") for n in ("ramp75_distill_ft", "ramp2of4_distill_ft"))
    assert codes["ramp75_distill_ft"] == 0
    # Without the reference's export the runs that need it are reported failed, not run.
    (reference / "config.json").unlink()
    order.clear()
    exports = False
    codes = study.run_all(list(jobs.values()), parallel=3)
    assert "ramp75_distill_ft" not in order and codes["ramp75_distill_ft"] == 1 and codes["ramp75"] == 0
    # Nor after a failed reference, even with an export left from an earlier run.
    (reference / "config.json").write_text("{}")
    study.run = lambda job: order.append(job.name) or int(job.name == "dense_finetune")
    order.clear()
    codes = study.run_all(list(jobs.values()), parallel=3)
    assert "ramp2of4_distill_ft" not in order and codes["ramp2of4_distill_ft"] == 1


def test_only_names_a_seed_replica_or_fails_before_any_run(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path)
    module = sys.modules["sparsity_study"]
    # A replica named alone asks for its seed: its run then exists, as with --seeds 1.
    module.check_only(study, ["l0_50_improved_seed1", "dense_finetune_l0_seed1", "dense_base"])
    assert study.opts.seeds == [1]
    names = {job.name for job in study.sweep_jobs()}
    assert {"l0_50_improved_seed1", "dense_finetune_l0_seed1"} <= names
    # A name with no run (a typo, or a replica of a run --seeds does not repeat) stops the study, naming it.
    for wrong in ("l0_50_improvd", "ramp65_seed1"):
        with pytest.raises(SystemExit, match=f"--only: no run named {wrong}; the runs are .*l0_50_improved"):
            module.check_only(_study(tmp_path), [wrong])
    for wrong in (["0"], ["2", "2"], ["-1"]):
        with pytest.raises(SystemExit):
            module.main(["sweep", "--smoke", "--seeds", *wrong, "--out", str(tmp_path / "o"), "--work", str(tmp_path)])
        assert "--seeds: distinct seeds >= 1" in capsys.readouterr().err


def test_run_tag_names_the_runs_as_long_as_l0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path)
    module = sys.modules["sparsity_study"]
    study.opts.run_tag = "3000steps"
    jobs = {job.name: job for job in study.sweep_jobs()}
    # The L0 runs and their dense reference carry the tag, in their exports too; the sweep's other runs do not.
    assert {"l0_50_improved_3000steps", "dense_finetune_l0_3000steps", "l0_50_improved_keep_layers_3000steps",
            "l0_50_improved_distill_ft_3000steps", "dense_finetune", "ramp75"} <= set(jobs)
    assert not {"l0_50_improved", "dense_finetune_l0", "ramp75_3000steps"} & set(jobs)
    assert jobs["l0_50_improved_3000steps"].export_to.name == "l0_50_improved_3000steps"
    # Distillation from the reference waits for, and reads, the reference of the same length.
    distill = jobs["l0_50_improved_distill_ft_3000steps"]
    assert distill.after == "dense_finetune_l0_3000steps"
    assert distill.callbacks[1]["init_args"]["teacher"].endswith("dense_finetune_l0_3000steps")
    # --only takes the names with or without the tag; a replica asks for its seed either way.
    only = ["l0_50_improved", "dense_finetune_l0_seed2", "l0_50_improved_keep_layers_3000steps"]
    module.check_only(study, only)
    assert only == ["l0_50_improved_3000steps", "dense_finetune_l0_3000steps_seed2",
                    "l0_50_improved_keep_layers_3000steps"]
    assert study.opts.seeds == [2]
    assert {"dense_finetune_l0_3000steps_seed2", "l0_50_improved_3000steps_seed2"} <= {
        job.name for job in study.sweep_jobs()}
    with pytest.raises(SystemExit):
        module.main(["sweep", "--smoke", "--run_tag", "a b", "--out", str(tmp_path / "o"), "--work", str(tmp_path)])
    assert "--run_tag: letters, digits" in capsys.readouterr().err


def test_ft_tag_names_the_fine_tunes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = _study(tmp_path)
    module = sys.modules["sparsity_study"]
    study.opts.ft_tag = "1000steps"
    jobs = {job.name: job for job in study.sweep_jobs()}
    # The dense fine-tune, the ramps and their distilled variants carry the tag, in their exports too; L0 does not.
    assert {"dense_finetune_1000steps", "ramp75_1000steps", "ramp2of4_1000steps", "ramp50_distill_ft_1000steps",
            "l0_50_improved", "dense_finetune_l0"} <= set(jobs)
    assert not {"dense_finetune", "ramp75", "l0_50_improved_1000steps"} & set(jobs)
    assert jobs["ramp75_1000steps"].export_to.name == "ramp75_1000steps"
    # Distillation from the ramps' reference waits for, and reads, the reference of the same length.
    distill = jobs["ramp75_distill_ft_1000steps"]
    assert distill.after == "dense_finetune_1000steps"
    assert distill.callbacks[1]["init_args"]["teacher"].endswith("dense_finetune_1000steps")
    # --only takes the names with or without the tag; a replica asks for its seed either way.
    only = ["ramp75_seed1", "dense_finetune", "ramp50_1000steps"]
    module.check_only(study, only)
    assert only == ["ramp75_1000steps_seed1", "dense_finetune_1000steps", "ramp50_1000steps"]
    assert study.opts.seeds == [1]
    replicas = {job.name: job for job in study.sweep_jobs()}
    assert {"ramp75_1000steps_seed1", "dense_finetune_1000steps_seed1", "ramp50_1000steps_seed1"} <= set(replicas)
    # A distilled ramp's replica waits for the same teacher (the seed-0 reference) as its run.
    assert replicas["ramp75_distill_ft_1000steps_seed1"].after == "dense_finetune_1000steps"
    # Both tags at once: each kind of run takes its own.
    study.opts.run_tag = "3000steps"
    names = {job.name for job in study.sweep_jobs()}
    assert {"l0_50_improved_3000steps", "ramp75_1000steps", "l0_50_improved_keep_layers_3000steps_seed1"} <= names
    with pytest.raises(SystemExit):
        module.main(["sweep", "--smoke", "--ft_tag", "1000 steps", "--out", str(tmp_path / "o"), "--work", str(tmp_path)])
    assert "--ft_tag: letters, digits" in capsys.readouterr().err


def test_validation_interval_fits_the_base_configs_epoch(tmp_path: Path) -> None:
    # Lightning refuses a val_check_interval longer than an epoch: the quickstart's is 600 batches, the GPU base's 1000.
    study = _study(tmp_path)
    assert "--trainer.val_check_interval=1000" in study.steps(3000)
    study.opts.base_config = str(ROOT / "experiments" / "quickstart.yaml")
    assert study.steps(1800)[1:] == ["--trainer.val_check_interval=600", "--checkpoint.every_n_train_steps=600"]
    assert "--trainer.val_check_interval=150" in study.steps(300)
