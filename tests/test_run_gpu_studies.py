"""The GPU study driver's two-GPU modes start the runs they document, in order, from one base (a stub stands in
for Python, so nothing trains)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

STUB = """#!/bin/bash
echo "$*" >> "$WORK/calls.txt"
[ -n "${STUB_FAIL:-}" ] && [[ "$*" == *"$STUB_FAIL"* ]] && exit 1
case "$*" in *"base --only dense_base"*) mkdir -p "$WORK/sparsity/exports/dense_base"
  echo {} > "$WORK/sparsity/exports/dense_base/config.json";; esac
exit 0
"""


def _drive(tmp_path: Path, mode: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    result = subprocess.run(["bash", str(ROOT / "experiments" / "run_gpu_studies.sh"), mode], cwd=ROOT,
                            env={**os.environ, "PYTHON": str(stub), "GPUS": "2", "WORK": str(work), **env},
                            capture_output=True, text=True, timeout=60, check=False)
    calls = (work / "calls.txt").read_text().splitlines() if (work / "calls.txt").exists() else []
    return result, calls


@pytest.mark.parametrize(("mode", "expected"), [
    ("reading_goals", ["sweep collect --only dense_finetune ramp50 ramp75 ramp2of4",
                       "quantization_study.py table stacked collect"]),
    ("reading_rest", ["sweep collect --only l0_50_improved dense_finetune_l0",
                      "quantization_study.py qalft collect"]),
    ("reading_stack", ["quantization_study.py stacked collect"]),
    ("reading_l0", ["sweep collect --only dense_finetune_l0 l0_50_plain l0_scratch50_l0compute"]),
    ("reading_l0_stack", ["sweep collect --only dense_finetune_l0 l0_50_plain l0_scratch50_l0compute",
                          "quantization_study.py stacked collect"]),
])
def test_two_gpu_modes_train_the_base_then_start_their_studies(tmp_path: Path, mode: str, expected: list[str]) -> None:
    result, calls = _drive(tmp_path, mode)
    assert result.returncode == 0, result.stderr
    assert "base --only dense_base" in calls[0] and "--config experiments/pretrain/gpu_reading.yaml" in calls[0]
    base = str(tmp_path / "work" / "sparsity" / "exports" / "dense_base")
    for fragment in expected:
        assert sum(fragment in call for call in calls[1:]) == 1, (fragment, calls)
    if mode == "reading_l0":  # the from-scratch run is trained with the base's recipe file
        assert "--base_args --config experiments/pretrain/gpu_reading.yaml" in calls[1]
        return
    quantization = next(call for call in calls if "quantization_study.py" in call)
    assert f"--base_export {base}" in quantization
    if mode == "reading_rest":
        assert "--qat_reference base" in quantization
    if mode == "reading_stack":
        assert "--stack_scopes language_model whole whole_dense_head" in quantization


def test_no_studies_without_a_base_export(tmp_path: Path) -> None:
    # The base run fails before it exports: the studies must not start on a missing base.
    result, calls = _drive(tmp_path, "reading_goals", STUB_FAIL="base --only dense_base")
    assert result.returncode == 1 and len(calls) == 1
    assert "base rc=1" in result.stdout and "no base export" in result.stdout


def test_keep_base_reuses_an_exported_base(tmp_path: Path) -> None:
    _drive(tmp_path, "reading_rest")
    (tmp_path / "work" / "calls.txt").unlink()
    result, calls = _drive(tmp_path, "reading_rest", KEEP_BASE="1")
    assert result.returncode == 0, result.stderr
    assert not any("base --only dense_base" in call for call in calls) and "reading base kept" in result.stdout
    # Without KEEP_BASE the base trains again (its export is what every study starts from).
    _, calls = _drive(tmp_path, "reading_rest")
    assert "base --only dense_base" in calls[-3]


def test_reading_qalft_takes_float_lora_start_and_qlora_bases(tmp_path: Path) -> None:
    result, calls = _drive(tmp_path, "reading_qalft", LORA_FLOAT_BASE="float_finetune", QLORA_BASES="bnb_nf4 bnb_int8",
                           QALFT_PARALLEL="5")
    assert result.returncode == 0, result.stderr
    (qalft,) = [call for call in calls if "quantization_study.py qalft" in call]
    assert "--lora_float_base float_finetune --qlora_bases bnb_nf4 bnb_int8 --parallel 5" in qalft
    _, calls = _drive(tmp_path, "reading_qalft")
    assert "--lora_float_base base --qlora_bases --parallel 4" in calls[-1]


def test_reading_stack_takes_its_scopes_steps_and_distillation(tmp_path: Path) -> None:
    result, calls = _drive(tmp_path, "reading_stack", STACK_SCOPES="whole_dense_head whole_dense_head_global",
                           QAT_STEPS="1000", QAT_LR="2e-4", STACK_DISTILL="1")
    assert result.returncode == 0, result.stderr
    (stack,) = [call for call in calls if "quantization_study.py stacked" in call]
    assert "--stack_scopes whole_dense_head whole_dense_head_global --qat_steps 1000 --qat_lr 2e-4" in stack
    assert ("--qat_reference float_finetune --stack_ramp_end 0.7 --stack_activation_bits 8 --stack_distill "
            "--stack_teacher base") in stack
    assert "--run_tag 1000steps_lr2e-4 --parallel 2" in stack  # not the default length: the names say it
    assert "--parallel 2" in stack
    # QAT_REFERENCE=base: agreement against the base, no float fine-tune first.
    second = tmp_path / "second"
    second.mkdir()
    result, calls = _drive(second, "reading_stack", STACK_SCOPES="whole_vision50_text80", QAT_REFERENCE="base",
                           STACK_DISTILL="1", STACK_TEACHER="float_finetune", STACK_FEATURE_WEIGHT="1",
                           STACK_RAMP_END="0.5", STACK_ABITS="16")
    assert result.returncode == 0, result.stderr
    (stack,) = [call for call in calls if "quantization_study.py stacked" in call]
    assert ("--stack_scopes whole_vision50_text80 --qat_steps 300 --qat_lr 1e-4 --qat_reference base "
            "--stack_ramp_end 0.5 --stack_activation_bits 16 --stack_distill "
            "--stack_teacher float_finetune --stack_feature_weight 1 --parallel 1") in stack
    # STACK_SEEDS: the replicas and their float fine-tunes run beside the seed-0 runs.
    third = tmp_path / "third"
    third.mkdir()
    result, calls = _drive(third, "reading_stack", STACK_SCOPES="whole_vision40_text80 whole_vision50_text80",
                           STACK_SEEDS="1 2")
    assert result.returncode == 0, result.stderr
    (stack,) = [call for call in calls if "quantization_study.py stacked" in call]
    assert "--stack_ramp_end 0.7 --stack_activation_bits 8 --stack_seeds 1 2 --parallel 8" in stack  # 2 scopes x 3 seeds + 2 fine-tunes
    assert "--run_tag" not in stack


def test_pack_takes_summaries_and_the_validation_history_of_unfinished_runs(tmp_path: Path) -> None:
    import tarfile

    work = tmp_path / "work"
    files = {"results/quantization/summary_done.json": "{}", "quantization/logs/unfinished.log": "started",
             "quantization/runs/unfinished/runs/csv/version_0/metrics.csv": "step,val/loss\n500,0.1\n",
             "quantization/ckpt/unfinished/last.ckpt": "weights", "quantization/exports/done/model.safetensors": "w"}
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    archive = tmp_path / "results.tgz"
    subprocess.run(["bash", str(ROOT / "experiments" / "run_gpu_studies.sh"), "pack", str(archive)],
                   env={**os.environ, "WORK": str(work)}, check=True, capture_output=True, timeout=60)
    with tarfile.open(archive) as packed:
        names = set(packed.getnames())
    assert names == {"results/quantization/summary_done.json", "quantization/logs/unfinished.log",
                     "quantization/runs/unfinished/runs/csv/version_0/metrics.csv"}  # no weights


def test_reading_l0_of_another_length_tags_its_runs(tmp_path: Path) -> None:
    result, calls = _drive(tmp_path, "reading_l0", L0_STEPS="3000", L0_RUNS="dense_finetune_l0 l0_50_improved")
    assert result.returncode == 0, result.stderr
    (l0,) = [call for call in calls if "sweep collect" in call]
    assert "--only dense_finetune_l0 l0_50_improved --ft_steps 400 --l0_steps 3000 --run_tag 3000steps" in l0
    second = tmp_path / "second"
    second.mkdir()
    _, calls = _drive(second, "reading_l0", L0_RUNS="l0_50_improved")
    assert "--run_tag" not in calls[-1]  # the default length keeps the names the earlier runs have
    # The other modes with L0 runs name them the same way.
    for mode in ("reading", "reading_rest"):
        folder = tmp_path / mode
        folder.mkdir()
        _, calls = _drive(folder, mode, L0_STEPS="3000")
        (l0,) = [call for call in calls if "--only l0_50_improved dense_finetune_l0" in call]
        assert "--l0_steps 3000 --run_tag 3000steps" in l0
        (folder / "default").mkdir()
        _, calls = _drive(folder / "default", mode)
        assert all("--run_tag" not in call for call in calls if "sparsity_study" in call)


def test_quant_reuse_places_earlier_summaries_or_fails_naming_the_folder(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary_float_finetune_seed1.json").write_text("{}")
    result, calls = _drive(tmp_path, "reading_stack", QUANT_REUSE=str(earlier))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / "results" / "quantization" / "summary_float_finetune_seed1.json").read_text() == "{}"
    assert any("quantization_study.py stacked" in call for call in calls)
    missing = tmp_path / "missing"
    again = tmp_path / "again"
    again.mkdir()
    result, calls = _drive(again, "reading_stack", QUANT_REUSE=str(missing))
    assert result.returncode == 1 and f"QUANT_REUSE: no summary_*.json in {missing}" in result.stdout
    assert calls == []  # nothing started
