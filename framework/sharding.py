"""Whole parameters for plugin hooks under FSDP.

Under FSDP (Lightning's ``strategy: fsdp``, torch's FSDP1) a parameter seen outside forward and backward is this
rank's piece of a flat shard (1-D, possibly empty), and so is its gradient, while plugin buffers such as masks
stay full-size. A hook that reads or writes weights, gradients or a plugin's own parameters between steps
(scoring and re-applying masks, calibrating quantizers, reading gates for a log) does it inside
:func:`full_parameters`, which all-gathers the parameters for the block and, with ``writeback``, writes each
rank's shard of what the block changed back. On a single device and under DDP parameters are whole and it does
nothing.

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
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

# FSDP roots inside `full_parameters` -> (writeback, with_grads) of the outermost block, so nested blocks (a plugin
# method that gathers, called from a hook that already did) reuse it instead of failing in FSDP.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def fsdp_root(owner: pl.Trainer | pl.LightningModule | nn.Module | None) -> nn.Module | None:
    """The outermost ``FullyShardedDataParallel`` module holding ``owner``'s parameters; ``None`` when unsharded.

    ``owner`` is a trainer (its strategy's model), a LightningModule (its trainer's, since Lightning wraps the
    module from outside) or any module (searched itself).
    """
    if owner is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    trainer = owner if isinstance(owner, pl.Trainer) else getattr(owner, "_trainer", None)
    module = trainer.strategy.model if trainer is not None else owner
    if module is None or isinstance(module, FullyShardedDataParallel):
        return module
    if trainer is not None and not isinstance(trainer.strategy, FSDPStrategy):
        return None  # hooks call this every step: no walk over the model under other strategies
    # modules() walks parents before children: the first FSDP module met is the root.
    return next((m for m in module.modules() if isinstance(m, FullyShardedDataParallel)), None)


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
    if with_grads and not getattr(root, "_use_orig_params", True):
        raise ValueError("trainer.strategy.init_args.use_orig_params: plugins that edit gradients under FSDP need "
                         "true (Lightning's default), got false")
    from torch.distributed.fsdp import FullyShardedDataParallel

    _ACTIVE[root] = (writeback, with_grads)
    try:
        with FullyShardedDataParallel.summon_full_params(root, writeback=writeback, with_grads=with_grads):
            yield
    finally:
        del _ACTIVE[root]
