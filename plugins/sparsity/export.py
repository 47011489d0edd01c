"""Export of sparse weights: packed safetensors (``bitmask`` or ``nm``) and a bits-per-value report.

The HF model beside it already holds the masked weights as dense tensors (so ``from_pretrained`` just works);
these files are what an on-device runtime with weight compression would load, and their BPV is the honest size
of the selected layers: ``(1 - s) * value_bits + mask bits`` with the mask coded by :mod:`framework.storage`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.io import atomic_write_json
from framework.storage import PackedTensor, bpv_row, bpv_summary, pack, save_packed
from plugins.sparsity.config import Pattern
from plugins.sparsity.layer import follows_nm


def pack_sparse_weights(weights: dict[str, torch.Tensor], pattern: Pattern) -> dict[str, PackedTensor]:
    """Pack each weight as ``bitmask`` (the smaller of the two mask codings) or, when the pattern is N:M and the
    weight follows it, as ``nm`` unless that is larger: 2:4's 2-bit indices tie with the bitmask and keep the layout
    sparse tensor cores read, while 4:8's 3-bit indices cost 1.5 bits per weight against the bitmask's 1.
    Values keep the weight's dtype."""
    packed = {}
    for name, weight in weights.items():
        weight = weight.detach().cpu()
        bitmask = pack(weight, "bitmask", mask_coding="auto")
        if pattern.is_nm and follows_nm(weight, pattern.n, pattern.m):
            nm = pack(weight, "nm", n=pattern.n, m=pattern.m)
            packed[name] = nm if nm.storage_bits() <= bitmask.storage_bits() else bitmask
        else:
            packed[name] = bitmask
    return packed


def write_sparse_export(weights: dict[str, torch.Tensor], pattern: Pattern, directory: Path, name: str,
                        extra: dict | None = None) -> list[str]:
    """Write ``<name>.safetensors`` (packed weights, see :func:`framework.storage.save_packed`) and
    ``<name>_bpv.json`` (``layers``: one :func:`~framework.storage.bpv_row` per weight; ``summary``: the
    selection's totals) into ``directory``; return the two file names."""
    packed = pack_sparse_weights(weights, pattern)
    save_packed(packed, directory / f"{name}.safetensors")
    rows = [bpv_row(key, value) for key, value in packed.items()]
    report = {"pattern": str(pattern), **(extra or {}), "summary": bpv_summary(rows), "layers": rows}
    atomic_write_json(directory / f"{name}_bpv.json", report)
    return [f"{name}.safetensors", f"{name}_bpv.json"]
