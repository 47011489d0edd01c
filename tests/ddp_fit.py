"""One rank of a data-parallel fit, launched by ``torch.distributed.run`` from tests/test_ddp.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_fit.py CONFIG OUT_DIR [CKPT]``
(``CKPT``: resume from that checkpoint). Each rank builds the run from the config as ``vlmc fit`` would, trains,
saves its plugin tensors (masks, activation statistics, quantizer scales, L0 gates) and the masked weights to
``OUT_DIR/rank<r>.pt`` so the test can compare the ranks, then writes the run summary as ``vlmc fit`` does. Under
FSDP the tensors are saved whole (gathered by :func:`framework.sharding.full_parameters`), not as flat shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli import build
from framework.sharding import full_parameters

KEEP = ("weight_mask", "input_sq_mean", "input_count", "scale", "zero_point")
GATES = "l0_masks."  # the L0 plugin's gate parameters
LORA = ".lora_"  # PEFT's adapter weights
HEADS = ("glyph_head.",)  # a training aid's head on the model


class SaveRankState(Callback):
    """Saves the rank's plugin tensors at the end; counts nonzero gradients of pruned weights at every optimizer
    step (after the plugins' hooks, which run first)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pruned_grads = 0
        self.initial: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        with full_parameters(trainer, with_grads=True):
            for module in pl_module.model.modules():
                mask = getattr(module, "weight_mask", None)
                grad = module.weight.grad if mask is not None else None
                if grad is not None:
                    self.pruned_grads += int(grad[~mask].count_nonzero())

    def on_train_start(self, trainer, pl_module) -> None:
        # Trainable additions (adapters, heads) as they start, so a test can tell that they trained.
        with full_parameters(trainer):
            self.initial = {f"initial.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
                            for k, v in pl_module.model.state_dict().items() if LORA in k or k.startswith(HEADS)}

    def on_train_end(self, trainer, pl_module) -> None:
        with full_parameters(trainer):
            # FSDP2's state dict hands out its shards (DTensors) even while unsharded: gathered (a collective).
            full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pl_module.model.state_dict().items()}
            masked = {k.removesuffix("_mask") for k in full if k.endswith(".weight_mask")}
            state = {k: v.detach().cpu().clone() for k, v in full.items()
                     if k.endswith(KEEP) or k.startswith(GATES) or k in masked or LORA in k
                     or k.startswith(HEADS)}
        state.update(self.initial)
        state["pruned_grads"] = torch.tensor(self.pruned_grads)
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    ckpt_path = sys.argv[3] if len(sys.argv) > 3 else None
    cli = build(["--config", config], run=False)
    cli.trainer.callbacks.append(SaveRankState(out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    cli.after_fit()  # what `vlmc fit` runs next: the run summary (summary.json in OUT_DIR)
    # The process group's threads torn down before the interpreter's exit: once in a CI run, a rank whose fit had
    # finished aborted at exit ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
