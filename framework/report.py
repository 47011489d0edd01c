"""The end of a run: a table of task metrics on the console and a machine-readable ``summary.json``.

Sweeps and notebooks read ``summary.json``; it holds the last evaluation's metrics, every plugin's
:meth:`~framework.plugin.CompressionPlugin.summary`, the run's step count, and its environment (package versions,
threads, device), so two runs whose numbers differ can be told apart by what they ran on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from framework.io import atomic_write_json
from framework.plugin import find_plugins
from framework.sharding import full_parameters


#: Distributions whose versions a summary records: the numbers of a run depend on them as much as on the code.
_PACKAGES = ("torch", "transformers", "lightning", "tokenizers", "peft", "pillow", "numpy")


def environment() -> dict[str, Any]:
    """Python, platform, package versions, torch's CPU threads and the accelerator a run ran with."""
    import platform
    from importlib import metadata

    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _scalar(value: Any) -> float | int | str:
    if torch.is_tensor(value):
        value = value.item()
    return value


class RunReport(pl.Callback):
    """Remembers the last evaluation and writes the run summary.

    Args:
        filename: summary file name inside the run folder.
    """

    def __init__(self, filename: str = "summary.json") -> None:
        self.filename = filename
        self.eval_metrics: dict[str, float] = {}
        self.eval_step: int = -1

    def _capture(self, trainer: pl.Trainer) -> None:
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        if metrics:
            self.eval_metrics.update(metrics)
            self.eval_step = trainer.global_step

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._capture(trainer)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._capture(trainer)

    def run_folder(self, trainer: pl.Trainer) -> Path:
        if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
            return Path(trainer.checkpoint_callback.dirpath).parent
        return Path(trainer.log_dir or trainer.default_root_dir)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        params = sum(p.numel() for p in pl_module.parameters())
        plugins = {p.name: p.summary(pl_module.model) for p in find_plugins(trainer)}
        return {
            "global_step": trainer.global_step,
            "eval_step": self.eval_step,
            "parameters": params,
            "metrics": dict(sorted(self.eval_metrics.items())),
            "plugins": plugins,
            "environment": environment(),
        }

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        """Write the summary on rank zero (returned there; ``None`` elsewhere). Every rank calls it: plugin
        summaries read the model, which under FSDP every rank gathers together."""
        with full_parameters(trainer):
            summary = self.summary(trainer, pl_module)
        if not trainer.is_global_zero:
            return None
        path = self.run_folder(trainer) / self.filename
        atomic_write_json(path, summary)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "summary"):
                flat = {f"final/{k}": v for k, v in summary["metrics"].items()}
                flat.update({f"final/compression/{p}/{k}": v for p, d in summary["plugins"].items() for k, v in d.items()})
                experiment.summary.update(flat)
        print(format_table(summary))
        print(f"summary written to {path}")
        return summary


def format_table(summary: dict[str, Any]) -> str:
    """Task x metric table of the last evaluation, plus plugin results."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in summary["metrics"].items():
        parts = key.split("/")
        if len(parts) == 3:
            rows.setdefault(f"{parts[0]}/{parts[1]}", {})[parts[2]] = value
    columns = sorted({c for row in rows.values() for c in row})
    lines = [f"Final evaluation at step {summary['eval_step']} ({summary['parameters']:,} parameters)"]
    if rows:
        header = ["task"] + columns
        body = [[task] + [_fmt(row.get(c)) for c in columns] for task, row in sorted(rows.items())]
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    for plugin, values in summary["plugins"].items():
        if values:
            lines.append(f"{plugin}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)
