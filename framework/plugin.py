"""The one contract every compression technique follows.

A technique is a Lightning ``Callback`` subclassing :class:`CompressionPlugin`. Lightning runs
callback.setup -> module.setup -> module.configure_model -> checkpoint restore -> optimizers -> on_fit_start, so:

1. Structure changes happen in :meth:`CompressionPlugin.transform`, which :class:`framework.module.VLMModule`
   calls from ``configure_model``: after the HF model exists, before any checkpoint is restored and before the
   optimizer sees the parameters. ``transform`` must be idempotent. Masks, gates and quantizers are modules,
   parameters or buffers of the model, so they are checkpointed with it and reach the optimizer.
2. Training-time behaviour lives in the ordinary Lightning hooks; schedules are measured in steps
   (``trainer.global_step`` against ``trainer.estimated_stepping_batches``), never in wall time.
3. Callback state is scalars only (:meth:`plugin_state` / :meth:`load_plugin_state`); tensors live in the model.
   What a resumed run must share with its checkpoint (:meth:`config_echo`) is saved beside it and compared on
   restore, so a changed configuration fails with the keys that differ instead of silently continuing.
4. Arguments are checked in ``__init__`` (errors name the YAML key); model-dependent checks in ``transform``.
5. Modules are chosen with :class:`framework.selection.ModuleSelection`.
6. Logs go to ``compression/<plugin name>/<metric>`` through :meth:`log_metric` (step metrics only on the steps
   the trainer writes, every ``log_every_n_steps``); :meth:`summary` feeds the run's machine-readable summary.
7. Export: :meth:`prepare_export` turns the trained model into what is deployed (e.g. bakes masks into weights)
   and :meth:`export_artifacts` writes the plugin's own files beside the HF model.
8. :meth:`claims` names the parameters a plugin rewrites so two plugins that would fight over the same weights
   fail at start-up; :meth:`check_compatible` covers other meaningless combinations.
9. Training objectives: :meth:`loss_terms` adds named terms (regularisers, penalties, distillation) to the task
   loss; :meth:`param_groups` gives a plugin's own parameters their optimizer settings (learning rate, weight
   decay, ``maximize`` for Lagrange multipliers). Both are called by :class:`framework.module.VLMModule`.
10. Strategies: under FSDP a hook outside forward and backward sees parameters and gradients as flat shards, so a
    hook that reads or writes them (or runs the model itself) does it inside
    :func:`framework.sharding.full_parameters`, entered on every rank alike and only when it touches them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class PluginConflictError(ValueError):
    """Two plugins in one run cannot be combined."""


class CompressionPlugin(Callback):
    """Base class of every compression plugin.

    Subclasses set :attr:`name` (the log namespace) and override the hooks they need. Only scalar state is kept
    on the callback; it is saved in the checkpoint under :attr:`state_key`.
    """

    name: str = "plugin"
    #: Whether this plugin must be the only one rewriting its parameters. Two plugins conflict on a parameter only
    #: when both are exclusive: a plugin that reads the weights as they are (e.g. one that simulates a number
    #: format on top of whatever values the weights hold) composes with one that edits them.
    exclusive_claims: bool = True
    #: Whether ``vlmc export`` must first run validation with the run's data (the plugin finishes its state on
    #: data, e.g. calibrates, in the validation hooks) before :meth:`prepare_export`.
    export_needs_data: bool = False

    # ----------------------------------------------------------------- structure
    def transform(self, model: nn.Module) -> None:
        """Change the model's structure (add masks, gates, quantizers...). Idempotent."""

    def claims(self, model: nn.Module) -> set[str]:
        """Qualified names of the parameters this plugin rewrites (after :meth:`transform`)."""
        return set()

    def check_compatible(self, others: list[CompressionPlugin]) -> None:
        """Raise :class:`PluginConflictError` if this plugin cannot run beside ``others``."""

    # ----------------------------------------------------------------- training objective
    #: Whether :meth:`loss_terms` reads the per-layer hidden states of the step (``outputs.hidden_states``): the
    #: training step then asks the model for them (an instance may set it from its configuration).
    needs_hidden_states: bool = False

    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms for this training step, added to the task loss and logged as
        ``compression/<name>/loss_<term>``. ``outputs`` is the HF model output of the step (logits, loss)."""
        return {}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups for parameters this plugin owns, e.g. ``[{"params": gates, "lr": 0.1,
        "weight_decay": 0.0}]``. Parameters listed here are left out of the model's default groups. A group may
        set ``lr_schedule: False`` to keep its learning rate constant instead of following the warm-up/cosine
        schedule."""
        return []

    # ----------------------------------------------------------------- state
    def plugin_state(self) -> dict[str, int | float | str | bool | None]:
        """Scalar state to checkpoint (counters, schedule position, flags)."""
        return {}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`plugin_state` returned."""

    #: How the error on a changed configuration names it ("another <config_name> configuration").
    config_name = "plugin"

    def config_echo(self) -> dict[str, Any]:
        """Settings a resumed run must share with its checkpoint (JSON values); saved under ``config`` in the
        callback state and compared on restore. Empty: nothing is compared."""
        return {}

    def check_config(self, saved: str) -> None:
        """Compare the checkpoint's :meth:`config_echo` (JSON text) with this run's.

        Raises:
            ValueError: naming each key that differs, with both values.
        """
        before, now = json.loads(saved), json.loads(json.dumps(self.config_echo()))
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {before.get(k)!r}, config {now.get(k)!r}" for k in differ)
            raise ValueError(f"{self.name}: the checkpoint was made with another {self.config_name} configuration "
                             f"({detail}); a resumed run must use the same one")

    @property
    @override
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.plugin_state()
        echo = self.config_echo()
        if echo:
            state = {**state, "config": json.dumps(echo, sort_keys=True)}
        for key, value in state.items():
            if not isinstance(value, (int, float, str, bool, type(None))):
                raise TypeError(
                    f"{type(self).__name__}.plugin_state()['{key}'] is a {type(value).__name__}; plugin state must "
                    "be scalars (keep tensors in the model as buffers or parameters)"
                )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("config", None)
        if saved is not None:
            self.check_config(saved)
        self.load_plugin_state(state)

    # ----------------------------------------------------------------- logging and results
    def log_metric(self, pl_module: LightningModule, metric: str,
                   value: float | torch.Tensor | Callable[[], float | torch.Tensor], **kwargs: Any) -> None:
        """Log under ``compression/<name>/<metric>``. A one-element tensor is logged as it is: Lightning reads it
        when it writes the logs (every ``log_every_n_steps``), so a per-step log costs no host-device sync.

        A step-only metric (the default) is logged only on the steps whose logs the trainer writes: on the others
        Lightning would overwrite it unread, and each call costs host time that a launch-bound GPU step waits
        for. ``value`` may be a callable, evaluated only when the metric is logged."""
        kwargs.setdefault("on_step", True)
        kwargs.setdefault("on_epoch", False)
        if kwargs["on_step"] and not kwargs["on_epoch"] and not writes_step_logs(getattr(pl_module, "_trainer", None)):
            return
        if callable(value):
            value = value()
        value = value.detach().reshape(()) if isinstance(value, torch.Tensor) else float(value)
        pl_module.log(f"compression/{self.name}/{metric}", value, **kwargs)

    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        """Final numbers of the run for the machine-readable summary (e.g. sparsity reached)."""
        return {}

    # ----------------------------------------------------------------- export
    def prepare_export(self, model: nn.Module) -> None:
        """Turn ``model`` (a copy) into what is deployed, removing anything HF cannot save or load."""

    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        """Write the plugin's own files into ``directory``; return their names."""
        return []


def writes_step_logs(trainer: Trainer | None) -> bool:
    """Whether ``trainer`` writes the step metrics logged now (every ``log_every_n_steps``-th step and the last);
    true outside a trainer, or where Lightning cannot tell."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    try:
        return bool(connector.should_update_logs)
    except (AttributeError, NotImplementedError):
        return True


def find_plugins(trainer: Trainer | None) -> list[CompressionPlugin]:
    """The compression plugins among a trainer's callbacks, in config order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, CompressionPlugin)]


def check_plugins(plugins: list[CompressionPlugin], model: nn.Module) -> None:
    """Start-up checks across plugins: unique log names, declared conflicts, overlapping claims.

    Raises:
        PluginConflictError: naming both plugins and the reason.
    """
    seen: dict[str, CompressionPlugin] = {}
    for plugin in plugins:
        if plugin.state_key in seen:
            raise PluginConflictError(
                f"two {type(plugin).__name__} plugins share the name {plugin.name!r}; give each a distinct `name` "
                "so their state and logs do not collide"
            )
        seen[plugin.state_key] = plugin
    for plugin in plugins:
        plugin.check_compatible([other for other in plugins if other is not plugin])
    owners: dict[str, CompressionPlugin] = {}
    for plugin in plugins:
        for param in sorted(plugin.claims(model)):
            other = owners.get(param)
            if other is not None and plugin.exclusive_claims and other.exclusive_claims:
                raise PluginConflictError(
                    f"{other.name!r} ({type(other).__name__}) and {plugin.name!r} ({type(plugin).__name__}) both "
                    f"rewrite {param}; narrow one plugin's `targets` so they do not overlap"
                )
            owners[param] = plugin
