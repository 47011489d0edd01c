"""Building tiny runs the way the CLI does, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from framework.cli import build

TINY_DATA = {
    "class_path": "framework.VLMDataModule",
    "init_args": {
        "tasks": {"caption": 1.0, "autofill": 1.0},
        "image_size": 64,
        "batch_size": 4,
        "batches_per_epoch": 6,
        "val_samples": 4,
        "max_length": 128,
    },
}


def tiny_config(tmp_path: Path, *, spec: str = "experiments/models/llava-test.json", max_steps: int = 8,
                callbacks: list[dict[str, Any]] | None = None, data: dict[str, Any] | None = None,
                name: str = "config.yaml", **trainer: Any) -> Path:
    """Write a small run config (few steps, tiny model) and return its path."""
    config = {
        "seed_everything": 0,
        "model": {"class_path": "framework.VLMModule",
                  "init_args": {"model": spec, "lr": 3e-3, "max_new_tokens": 16, "warmup_fraction": 0.25}},
        "data": data or TINY_DATA,
        "trainer": {
            "max_steps": max_steps,
            "val_check_interval": 3,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": callbacks or [],
            **trainer,
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 4, "save_top_k": -1},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def make_cli(config: Path, *extra: str) -> Any:
    return build(["--config", str(config), *extra], run=False)


def model_state(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


class StopAt(pl.Callback):
    """Simulates an interruption after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit_straight_and_resumed(tmp_path: Path, write_config: Any, *extra: str, stop: int = 4) -> dict[str, Any]:
    """Fit one config twice: straight through, and stopped after ``stop`` steps then resumed from that step's
    checkpoint (``write_config(folder)`` writes the config of a run folder). Returns the two finished CLIs."""
    runs = {}
    for name in ("straight", "resumed"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder)
        ckpt = None
        if name == "resumed":
            first = make_cli(config, *extra)
            first.trainer.callbacks.append(StopAt(stop))
            first.trainer.fit(first.model, datamodule=first.datamodule)
            ckpt = str(folder / "ckpt" / f"epoch=0-step={stop}.ckpt")
        cli = make_cli(config, *extra)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        runs[name] = cli
    return runs
