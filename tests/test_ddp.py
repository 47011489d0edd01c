"""Plugins under data parallelism: two CPU processes (gloo) launched by torchrun; the sparsity masks, activation
statistics and quantizer encodings must come out identical on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import tiny_config

NO_VAL = {"limit_val_batches": 0, "val_check_interval": None}


def _fit_on_two_ranks(tmp_path: Path, callbacks: list, max_steps: int,
                      **trainer: object) -> list[dict[str, torch.Tensor]]:
    # No strategy given: the CLI picks DDP that looks for unused parameters (see test_cli).
    trainer = {"accelerator": "cpu", "devices": 2, **trainer}
    config = tiny_config(tmp_path, max_steps=max_steps, callbacks=callbacks, logger=False, **trainer, **NO_VAL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "ddp_fit.py"), str(config), str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, msg=key)
    return ranks


def test_sparsity_and_qat_agree_across_ranks(tmp_path: Path) -> None:
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_every": 2,
                          "score": "activation", "scope": "global", "stats_steps": None}}
    qat = {"class_path": "plugins.quantization.QuantizationAwareTraining",
           "init_args": {"weights": {"bits": 4, "granularity": "channel"},
                         "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                         "calibration_batches": 2, "scale_lr": 1e-2}}
    ranks = _fit_on_two_ranks(tmp_path, [ramp, qat], max_steps=6)
    masks = [k for k in ranks[0] if k.endswith("weight_mask")]
    scales = [k for k in ranks[0] if k.endswith("scale")]
    assert len(masks) == 14 and len(scales) == 28
    # The global ramp reached its target from statistics gathered on both ranks' (different) batches.
    kept = sum(int(ranks[0][k].sum()) for k in masks)
    assert abs(1 - kept / sum(ranks[0][k].numel() for k in masks) - 0.5) < 0.01
    assert all(int(ranks[0][k]) > 0 for k in ranks[0] if k.endswith("input_count"))


def test_l0_gates_agree_across_ranks(tmp_path: Path) -> None:
    l0 = {"class_path": "plugins.l0_pruning.L0Pruning", "init_args": {"target_fraction": 0.5, "method": "improved"}}
    ranks = _fit_on_two_ranks(tmp_path, [l0], max_steps=6)
    gates = [k for k in ranks[0] if k.startswith("l0_masks.")]
    assert gates and any(not torch.all(ranks[0][k] == ranks[0][k].flatten()[0]) for k in gates), "gates learned"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs two CUDA GPUs (Lightning refuses it on CPU)")
def test_sparsity_and_qat_under_fsdp(tmp_path: Path) -> None:
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.5, "start_step": 0, "end_step": 4, "update_every": 2}}
    qat = {"class_path": "plugins.quantization.QuantizationAwareTraining",
           "init_args": {"weights": {"bits": 4, "granularity": "channel"},
                         "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                         "calibration_batches": 2}}
    ranks = _fit_on_two_ranks(tmp_path, [ramp, qat], max_steps=6, accelerator="gpu", strategy="fsdp")
    masks = [k for k in ranks[0] if k.endswith("weight_mask")]
    assert masks and abs(1 - sum(int(ranks[0][k].sum()) for k in masks)
                         / sum(ranks[0][k].numel() for k in masks) - 0.5) < 0.01
