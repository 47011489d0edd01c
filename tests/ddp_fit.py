"""One rank of a data-parallel fit, launched by ``torch.distributed.run`` from tests/test_ddp.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_fit.py CONFIG OUT_DIR``. Each
rank builds the run from the config as ``vlmc fit`` would, trains, and saves its plugin tensors (masks, activation
statistics, quantizer scales, L0 gates) to ``OUT_DIR/rank<r>.pt`` so the test can compare the ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli import build  # noqa: E402

KEEP = ("weight_mask", "input_sq_mean", "input_count", "scale", "zero_point")
GATES = "l0_masks."  # the L0 plugin's gate parameters


class SaveRankState(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        state = {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()
                 if k.endswith(KEEP) or k.startswith(GATES)}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    cli = build(["--config", config], run=False)
    cli.trainer.callbacks.append(SaveRankState(out))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


if __name__ == "__main__":
    main()
