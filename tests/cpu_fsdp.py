"""Lightning's FSDP strategy (torch FSDP1) on CPU processes, so the FSDP tests run without GPUs.

Lightning refuses ``strategy: fsdp`` on a CPU accelerator when the strategy is given by name or as an exact
``FSDPStrategy`` (a subclass passes), and it wraps the model with ``device_id=None`` on CPU, which torch's FSDP
rejects when no accelerator exists ("FSDP needs a non-CPU accelerator device"). With ``device_id=cpu`` FSDP1
shards, all-gathers and reduce-scatters over gloo as it does over NCCL, so plugins see the same flat local shards
outside forward and backward as on GPUs. One more CPU-only difference: Lightning gathers full checkpoints with
``offload_to_cpu=True``, and on CPU FSDP1's offload "moves" the gathered parameters to the device they are already
on and then frees them, so ``state_dict()`` reads freed memory (a segfault); here checkpoints gather without it.
A config names the strategy by class path (``tests/`` is on ``sys.path`` when ``tests/ddp_fit.py`` runs)::

    trainer:
      accelerator: cpu
      devices: 2
      strategy: {class_path: cpu_fsdp.CPUFSDPStrategy}

For tests only: FSDP on CPU is slow and not what the project trains with.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from unittest import mock

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from typing_extensions import override


def _full_state_dict_context(module: nn.Module, world_size: int, rank0_only: bool = True) -> AbstractContextManager:
    """Lightning's full-state-dict context without ``offload_to_cpu`` (see the module docstring)."""
    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                 rank0_only=rank0_only))


@contextmanager
def _no_offload() -> Iterator[None]:
    with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", _full_state_dict_context):
        yield


class CPUFSDPStrategy(FSDPStrategy):
    """:class:`~lightning.pytorch.strategies.FSDPStrategy` for CPU devices (gloo); takes the same arguments."""

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if self.root_device.type == "cpu" and not any(isinstance(m, FSDP) for m in model.modules()):
            # Wrapped here with a CPU device id; Lightning then finds it wrapped and only finishes the set-up.
            model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        return super()._setup_model(model)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _no_offload():
            return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        with _no_offload():
            return super().optimizer_state(optimizer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Mapping[str, Any]:
        with _no_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)
