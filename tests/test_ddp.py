"""Plugins under data parallelism: two CPU processes (gloo) launched by torchrun; the sparsity masks, activation
statistics and quantizer encodings must come out identical on both ranks. FSDP runs on CPU too, through the
test-only :class:`cpu_fsdp.CPUFSDPStrategy` (Lightning's own refuses CPU), and again on two GPUs when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import tiny_config

NO_VAL = {"limit_val_batches": 0, "val_check_interval": None}
CPU_FSDP = {"class_path": "cpu_fsdp.CPUFSDPStrategy"}
#: FSDP2 (torch's fully_shard) through Lightning's ModelParallelStrategy, data parallel over both processes.
FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}}


def _fit_on_two_ranks(tmp_path: Path, callbacks: list, max_steps: int, ckpt_path: Path | None = None,
                      validate: bool = False, **trainer: object) -> list[dict[str, torch.Tensor]]:
    # Unless a strategy is given the CLI picks DDP that looks for unused parameters (see test_cli).
    trainer = {"accelerator": "cpu", "devices": 2, **trainer, **({} if validate else NO_VAL)}
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(tmp_path, max_steps=max_steps, callbacks=callbacks, logger=False, **trainer)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    resume = [str(ckpt_path)] if ckpt_path is not None else []
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "ddp_fit.py"), str(config), str(tmp_path), *resume],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)
    return ranks


def _ramp_and_qat(score: str = "activation", scope: str = "global") -> list[dict]:
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_every": 2,
                          "score": score, "scope": scope, "stats_steps": None}}
    qat = {"class_path": "plugins.quantization.QuantizationAwareTraining",
           "init_args": {"weights": {"bits": 4, "granularity": "channel"},
                         "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                         "calibration_batches": 2, "scale_lr": 1e-2}}
    return [ramp, qat]


def _check_sparsity_and_quantizers(ranks: list[dict[str, torch.Tensor]]) -> None:
    """50% sparsity with pruned weights and their gradients exactly zero; quantizers calibrated and whole."""
    state = ranks[0]
    masks = [k for k in state if k.endswith("weight_mask")]
    scales = [k for k in state if k.endswith("scale")]
    assert len(masks) == 14 and len(scales) == 28
    kept = sum(int(state[k].sum()) for k in masks)
    assert abs(1 - kept / sum(state[k].numel() for k in masks) - 0.5) < 0.01
    for key in masks:
        weight = state[key.removesuffix("_mask")]
        assert weight.shape == state[key].shape and not weight[~state[key]].any(), key
    assert int(state["pruned_grads"]) == 0, "a pruned weight had a gradient at an optimizer step"
    assert all(bool(state[k]) for k in state if k.endswith("initialized"))
    for key in scales:  # whole (per output channel, or one per tensor), not FSDP's flat shards
        rows = state[key.replace("weight_quantizer.scale", "weight_mask")].shape[0] if "weight_" in key else 1
        assert state[key].shape == ((rows, 1) if "weight_" in key else (1,)), key


def test_sparsity_and_qat_agree_across_ranks(tmp_path: Path) -> None:
    ranks = _fit_on_two_ranks(tmp_path, _ramp_and_qat(), max_steps=6)
    _check_sparsity_and_quantizers(ranks)
    # The global ramp reached its target from statistics gathered on both ranks' (different) batches.
    assert all(int(ranks[0][k]) > 0 for k in ranks[0] if k.endswith("input_count"))


@pytest.mark.parametrize("strategy", [CPU_FSDP, FSDP2], ids=["fsdp", "fsdp2"])
def test_sparsity_and_qat_under_fsdp_on_cpu(tmp_path: Path, strategy: dict) -> None:
    # Outside forward FSDP shows each rank a flat shard of every parameter (FSDP2: a DTensor of its rows): masks
    # are scored on the whole weights, re-applied after each step and the quantizers calibrated through
    # framework.sharding.
    ranks = _fit_on_two_ranks(tmp_path, _ramp_and_qat(), max_steps=6, strategy=strategy)
    _check_sparsity_and_quantizers(ranks)
    assert all(int(ranks[0][k]) > 0 for k in ranks[0] if k.endswith("input_count"))
    # Resumed after the ramp's last update (step 4), through a whole checkpoint: the same final masks.
    resumed = _fit_on_two_ranks(tmp_path / "resumed", _ramp_and_qat(), max_steps=6, strategy=strategy,
                                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    _check_sparsity_and_quantizers(resumed)
    for key in (k for k in ranks[0] if k.endswith("weight_mask")):
        assert torch.equal(resumed[0][key], ranks[0][key]), key


@pytest.mark.parametrize("strategy", [CPU_FSDP, FSDP2], ids=["fsdp", "fsdp2"])
def test_oneshot_ptq_and_channel_ablation_under_fsdp_on_cpu(tmp_path: Path, strategy: dict) -> None:
    # Calibration runs the model from hooks, outside the trainer's forward: inside full_parameters under FSDP.
    oneshot = {"class_path": "plugins.sparsity.OneShotPruning",
               "init_args": {"method": "activation", "sparsity": 0.5, "scope": "global", "calibration_batches": 2}}
    ptq = {"class_path": "plugins.quantization.PostTrainingQuantization",
           "init_args": {"weights": {"bits": 4, "granularity": "channel"},
                         "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                         "calibration_batches": 2}}
    ablation = {"class_path": "plugins.channel_ablation.ChannelAblation",
                "init_args": {"fraction": 0.25, "targets": {"include": "vision_tower", "types": ["Linear"]}}}
    ranks = _fit_on_two_ranks(tmp_path, [oneshot, ptq, ablation], max_steps=4, strategy=strategy)
    _check_sparsity_and_quantizers(ranks)
    summary = json.loads((tmp_path / "summary.json").read_text())["plugins"]
    assert summary["ptq"]["calibrated"] == 1 and summary["channel_ablation"]["zeroed_fraction"] == 0.25


def test_fsdp2_validates_by_generation_and_exports(tmp_path: Path) -> None:
    # Generation gathers the sharded blocks in every forward: ranks whose answers end early keep stepping with the
    # others (HF's synced_gpus) instead of leaving them waiting in a collective. The whole checkpoint exports as
    # from a single device.
    ramp = _ramp_and_qat(score="magnitude", scope="layer")[0]
    _fit_on_two_ranks(tmp_path, [ramp], max_steps=6, validate=True, strategy=FSDP2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_step"] == 6 and "val/caption/fact_recall" in summary["metrics"]
    assert summary["plugins"]["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "framework.cli", "export", "--config", str(tmp_path / "config.yaml"),
                    "--trainer.devices=1", "--trainer.strategy=auto", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                    "--out", str(out)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
                   check=True, capture_output=True, timeout=600)
    from framework.models import load_vlm

    exported = load_vlm(str(out)).model.state_dict()
    trained = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in trained.items() if k.startswith("model.") and "_mask" not in k}
    for name, tensor in exported.items():
        if name in weights:
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0, msg=name)
    assert sum(name in weights for name in exported) > 20


def test_qalft_with_distillation_under_fsdp2_on_cpu(tmp_path: Path) -> None:
    # LoRA (PEFT) is injected before sharding, so the adapters are sharded with their blocks; the teacher is a whole
    # frozen copy on each rank. The adapters train and come out the same on both ranks.
    from framework.export import export_model
    from framework.models import load_vlm

    torch.manual_seed(0)
    loaded = load_vlm(str(ROOT / "experiments" / "models" / "llava-test.json"))
    teacher = export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "teacher", [])
    qalft = {"class_path": "plugins.quantization.QALFT",
             "init_args": {"base": "float", "r": 4, "alpha": 8.0, "adapter_name": "caption"}}
    distill = {"class_path": "plugins.distillation.Distillation", "init_args": {"teacher": str(teacher)}}
    ranks = _fit_on_two_ranks(tmp_path / "run", [qalft, distill], max_steps=4, strategy=FSDP2)
    adapters = [k for k in ranks[0] if ".lora_" in k and not k.startswith("initial.")]
    assert adapters and all(ranks[0][k].shape[1] == 4 for k in adapters if ".lora_B." in k)
    assert all(not torch.equal(ranks[0][k], ranks[0][f"initial.{k}"]) for k in adapters), "every adapter trained"


def test_glyph_supervision_under_fsdp2_on_cpu(tmp_path: Path) -> None:
    # The reading head sits on the model, outside the sharded blocks (the root's unit), and reads the vision tower's
    # features after the forward: it trains, the same on both ranks.
    glyphs = {"class_path": "plugins.glyph_supervision.GlyphSupervision", "init_args": {"weight": 1.0}}
    ranks = _fit_on_two_ranks(tmp_path, [glyphs], max_steps=4, strategy=FSDP2)
    head = [k for k in ranks[0] if k.startswith("glyph_head.")]
    assert head and all(not torch.equal(ranks[0][k], ranks[0][f"initial.{k}"]) for k in head), "the head trained"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 4


@pytest.mark.parametrize("strategy", [None, CPU_FSDP, FSDP2], ids=["ddp", "fsdp", "fsdp2"])
def test_l0_gates_agree_across_ranks(tmp_path: Path, strategy: dict | None) -> None:
    l0 = {"class_path": "plugins.l0_pruning.L0Pruning", "init_args": {"target_fraction": 0.5, "method": "improved"}}
    ranks = _fit_on_two_ranks(tmp_path, [l0], max_steps=6, **({"strategy": strategy} if strategy else {}))
    gates = [k for k in ranks[0] if k.startswith("l0_masks.")]
    assert gates and any(not torch.all(ranks[0][k] == ranks[0][k].flatten()[0]) for k in gates), "gates learned"
    # The summary reads the gates and counts the parameters: whole ones under FSDP too, not rank 0's shards.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parameters"] == summary["plugins"]["l0_pruning"]["params_before"] + sum(
        ranks[0][k].numel() for k in gates)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the CPU variant runs everywhere)")
@pytest.mark.parametrize("strategy", ["fsdp", FSDP2], ids=["fsdp", "fsdp2"])
def test_sparsity_and_qat_under_fsdp(tmp_path: Path, strategy: str | dict) -> None:
    ranks = _fit_on_two_ranks(tmp_path, _ramp_and_qat(score="magnitude", scope="layer"), max_steps=6,
                              accelerator="gpu", strategy=strategy)
    _check_sparsity_and_quantizers(ranks)
