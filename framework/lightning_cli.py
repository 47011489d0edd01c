"""The LightningCLI subclass behind ``vlmc fit/validate/test/predict`` and its config-saving callback.

Module-level classes (not classes made inside a factory) so that spawn-based strategies (``ddp_spawn``) can
pickle the trainer's callbacks; :mod:`framework.cli` imports this module lazily, keeping ``vlmc --help`` fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from framework.report import RunReport


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run folder (beside ``checkpoints/`` and
    ``summary.json``), once the checkpoint folder is known, instead of in the logger's folder."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pass  # the run folder is resolved by ModelCheckpoint's own setup, which runs later

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        from framework.io import atomic_write_text

        folder = RunReport().run_folder(trainer)
        target = (folder / self.config_filename).resolve()
        inputs = {Path(str(c)).resolve() for c in (self.config.get("config") or [])}
        if target in inputs:  # never replace a config the run was started from
            target = target.with_name(f"resolved_{self.config_filename}")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, self.parser.dump(self.config, skip_none=False))
        self.already_saved = True


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the final weights of a finished fit.

    Lightning writes ``last.ckpt`` at each ``every_n_train_steps`` save, and at the end of training only if none
    was written before. A run whose ``max_steps`` is not a multiple of that interval (or that ``max_time`` stops)
    therefore kept the weights of its last multiple: ``vlmc export --ckpt_path last.ckpt`` lost the final steps.
    """

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class VLMCLI(LightningCLI):
    """LightningCLI with the project's defaults: W&B logger, atomic checkpoints, run summary."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunReport, "report")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})

    def before_instantiate_classes(self) -> None:
        # Every batch holds one task: a text-only batch leaves the vision tower without gradients, which DDP
        # refuses unless told to look for unused parameters. Several devices with the default strategy get that.
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("strategy", "auto") == "auto" and _several(trainer.get("devices")):
            trainer["strategy"] = "ddp_find_unused_parameters_true"

    def _run_report(self) -> RunReport:
        return next(c for c in self.trainer.callbacks if isinstance(c, RunReport))

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        report = self._run_report()
        # The table reports the final weights: evaluate once more unless the last validation was at the end.
        if report.eval_step != self.trainer.global_step and self.trainer.limit_val_batches != 0:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._finish_run()

    def after_validate(self) -> None:
        self._finish_run()

    def after_test(self) -> None:
        self._finish_run()

    def _finish_run(self) -> None:
        """Write the run summary, then close the W&B run."""
        self._run_report().write(self.trainer, self.model)
        _finish_wandb(self.trainer)

    config_saver = RunConfigSaver


def _finish_wandb(trainer: Any) -> None:
    """Close the run's W&B run, which Lightning leaves open, so that a later run in the same process (a notebook,
    a sweep) gets its own W&B run instead of silently logging into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _several(devices: Any) -> bool:
    """Whether a ``trainer.devices`` value asks for more than one device (``auto`` / -1 count the visible GPUs)."""
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) > 1
    if devices in ("auto", -1, "-1", None):
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() > 1
    try:
        return int(devices) > 1
    except (TypeError, ValueError):
        return False
