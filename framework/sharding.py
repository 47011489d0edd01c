"""Whole parameters for plugin hooks under FSDP, and FSDP2's sharding of a VLM.

Under FSDP (Lightning's ``strategy: fsdp``, torch's FSDP1) a parameter seen outside forward and backward is this
rank's piece of a flat shard (1-D, possibly empty), and so is its gradient; under FSDP2 (Lightning's
``ModelParallelStrategy``, torch's ``fully_shard``, applied by :func:`shard_model`) it is a ``DTensor`` holding this
rank's rows. Plugin buffers such as masks stay full-size under both. A hook that reads or writes weights, gradients
or a plugin's own parameters between steps (scoring and re-applying masks, calibrating quantizers, reading gates
for a log) does it inside :func:`full_parameters`, which all-gathers the parameters for the block and, with
``writeback``, writes each rank's shard of what the block changed back. On a single device and under DDP
parameters are whole and it does nothing.

It is a collective: every rank must enter it together, so plugins decide from state all ranks share (the step,
buffers), never from rank-local values. Each entry costs an all-gather of the model (and one of the gradients with
``with_grads``), so plugins enter it only on the steps where they touch parameters.

Example::

    with full_parameters(trainer, writeback=True):
        layer.weight.mul_(layer.weight_mask)  # the whole weight, on every rank; each keeps its shard of the result
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

# FSDP roots inside `full_parameters` -> (writeback, with_grads) of the outermost block, so nested blocks (a plugin
# method that gathers, called from a hook that already did) reuse it instead of failing in FSDP.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def fsdp_root(owner: pl.Trainer | pl.LightningModule | nn.Module | None) -> nn.Module | None:
    """The outermost FSDP module holding ``owner``'s parameters (``FullyShardedDataParallel``, or a module FSDP2's
    ``fully_shard`` was applied to); ``None`` when unsharded.

    ``owner`` is a trainer (its strategy's model), a LightningModule (its trainer's, since Lightning wraps the
    module from outside) or any module (searched itself).
    """
    if owner is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    trainer = owner if isinstance(owner, pl.Trainer) else getattr(owner, "_trainer", None)
    module = trainer.strategy.model if trainer is not None else owner
    if module is None or isinstance(module, FullyShardedDataParallel | FSDPModule):
        return module
    if trainer is not None and not isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
        return None  # hooks call this every step: no walk over the model under other strategies
    # modules() walks parents before children: the first FSDP module met is the root.
    return next((m for m in module.modules() if isinstance(m, FullyShardedDataParallel | FSDPModule)), None)


@contextmanager
def full_parameters(owner: pl.Trainer | pl.LightningModule | nn.Module | None, *, writeback: bool = False,
                    with_grads: bool = False) -> Iterator[None]:
    """Inside the block every parameter (and, with ``with_grads``, its gradient) of an FSDP model is whole.

    A no-op unless ``owner``'s model is wrapped by FSDP (see :func:`fsdp_root`). Every rank must enter it.

    Args:
        owner: the trainer, LightningModule or module whose parameters the block uses.
        writeback: keep in-place changes made inside the block (each rank writes back its shard, so every rank
            must make the same change); ``False``: they are discarded when the block ends.
        with_grads: gather the gradients too (and write them back with ``writeback``); needs FSDP's
            ``use_orig_params=True``, Lightning's default.

    Raises:
        ValueError: ``with_grads`` with ``use_orig_params=False``.
        RuntimeError: a nested block asks for ``writeback`` or ``with_grads`` that the outer block lacks.
    """
    root = fsdp_root(owner)
    if root is None:
        yield
        return
    outer = _ACTIVE.get(root)
    if outer is not None:
        if (writeback and not outer[0]) or (with_grads and not outer[1]):
            raise RuntimeError(f"full_parameters(writeback={writeback}, with_grads={with_grads}) nested in a block "
                               f"opened with writeback={outer[0]}, with_grads={outer[1]}; open the outer block with "
                               "what the inner one needs")
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        if with_grads and not getattr(root, "_use_orig_params", True):
            raise ValueError("trainer.strategy.init_args.use_orig_params: plugins that edit gradients under FSDP "
                             "need true (Lightning's default), got false")
        whole = FullyShardedDataParallel.summon_full_params(root, writeback=writeback, with_grads=with_grads)
    else:  # FSDP2
        whole = _unsharded_units(root, writeback=writeback, with_grads=with_grads)
    _ACTIVE[root] = (writeback, with_grads)
    try:
        with whole:
            yield
    finally:
        del _ACTIVE[root]


@contextmanager
def _unsharded_units(root: nn.Module, *, writeback: bool, with_grads: bool) -> Iterator[None]:
    """FSDP2: every ``fully_shard`` unit under ``root`` unsharded (FSDP2's own all-gather) for the block.

    The modules then hold whole plain parameters, as inside a forward, and a forward run inside the block keeps them
    (no resharding after it until the block ends). With ``with_grads`` the sharded gradients are gathered onto the
    whole parameters. On exit, with ``writeback``, each rank copies its rows of the block's result (and gradients)
    into its shard; then every unit reshards and gets its resharding setting back.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    units = [module for module in root.modules() if isinstance(module, FSDPModule)]
    places: dict[int, tuple[nn.Module, str, DTensor]] = {}  # once per tensor: a table tied to the head is one
    for module in root.modules():
        for name, param in module._parameters.items():
            if isinstance(param, DTensor) and id(param) not in places:
                places[id(param)] = (module, name, param)
    settings = [_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    if with_grads:
        for module, name, sharded in places.values():
            if sharded.grad is not None:
                module._parameters[name].grad = sharded.grad.full_tensor()
    try:
        yield
        if writeback:
            with torch.no_grad():
                for module, name, sharded in places.values():
                    # This rank's rows, cut as FSDP2 cut them, from its own copy (every rank made the same change).
                    full = module._parameters[name]
                    rows = distribute_tensor(full.detach(), sharded.device_mesh, sharded.placements, src_data_rank=None)
                    sharded.to_local().copy_(rows.to_local())
                    if with_grads and sharded.grad is not None and full.grad is not None:
                        grad = distribute_tensor(full.grad, sharded.device_mesh, sharded.placements, src_data_rank=None)
                        sharded.grad.to_local().copy_(grad.to_local())
    finally:
        for module, name, _ in places.values():
            module._parameters[name].grad = None
        for unit, setting in zip(units, settings, strict=True):
            unit.reshard()
            _restore_reshard_setting(unit, setting)


def _reshard_setting(unit: nn.Module) -> tuple[bool, list[object]] | None:
    """A unit's resharding-after-forward state (FSDP2 keeps it on its state and parameter groups)."""
    state = unit._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None or not hasattr(state, "_auto_reshard_after_forward"):
        return None
    return state._auto_reshard_after_forward, [group.post_forward_mesh_info for group in groups]


def _restore_reshard_setting(unit: nn.Module, setting: tuple[bool, list[object]] | None) -> None:
    if setting is None:  # a torch whose FSDP2 keeps it elsewhere: the default, resharding after forward
        unit.set_reshard_after_forward(True, recurse=False)
        return
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward = setting[0]
    for group, mesh_info in zip(state._fsdp_param_groups, setting[1], strict=True):
        group.post_forward_mesh_info = mesh_info


def shard_model(model: nn.Module, mesh: object) -> nn.Module:
    """FSDP2 over ``mesh``: each block named in the HF model's ``_no_split_modules`` (decoder and encoder layers,
    embeddings) is one ``fully_shard`` unit, gathered for its own forward and backward, and the model is the root,
    which holds the rest (token table, head, norms, plugins' parameters outside the blocks). Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unsharded_class(module: nn.Module) -> type:
    """``module``'s own class: FSDP2's ``fully_shard`` gives a sharded module a subclass (``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))
