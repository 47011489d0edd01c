"""Export of sparse weights: packed safetensors (``bitmask`` or ``nm``) and a bits-per-value report.

The HF model beside it already holds the masked weights as dense tensors (so ``from_pretrained`` just works);
these files are what an on-device runtime with weight compression would load, and their BPV is the honest size
of the selected layers: ``(1 - s) * value_bits + mask bits`` with the mask coded by :mod:`framework.storage`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framework.io import atomic_write_json
from framework.storage import INDEX_CODINGS, PackedTensor, bpv_report, bpv_row, pack, save_packed
from plugins.sparsity.config import Pattern
from plugins.sparsity.layer import follows_nm


def pack_sparse_weights(weights: dict[str, torch.Tensor], pattern: Pattern,
                        index_coding: str = "auto") -> dict[str, PackedTensor]:
    """Pack each weight as ``bitmask`` (the smaller of the two mask codings) or, when the pattern is N:M and the
    weight follows it, as ``nm`` with ``index_coding`` (``positions``, ``enumerative``, or ``auto``: the smallest of
    both and the bitmask; ties go to the N:M positions, the layout sparse tensor cores read). With positions, 2:4's
    2-bit indices cost 1 bit per weight like the bitmask, and 4:8's 3-bit indices 1.5; enumerative coding costs
    about log2(C(m, n)) / m: 0.65 at 2:4, 0.78 at 4:8. Values keep the weight's dtype."""
    if index_coding not in (*INDEX_CODINGS, "auto"):
        raise ValueError(f"index_coding: must be one of {', '.join((*INDEX_CODINGS, 'auto'))}, got {index_coding!r}")
    packed = {}
    for name, weight in weights.items():
        weight = weight.detach().cpu()
        bitmask = pack(weight, "bitmask", mask_coding="auto")
        if pattern.is_nm and follows_nm(weight, pattern.n, pattern.m):
            codings = INDEX_CODINGS if index_coding == "auto" else (index_coding,)
            candidates = [pack(weight, "nm", n=pattern.n, m=pattern.m, index_coding=c) for c in codings]
            if index_coding == "auto":
                candidates.append(bitmask)
            packed[name] = min(candidates, key=lambda p: p.storage_bits())  # first of equals wins
        else:
            packed[name] = bitmask
    return packed


def write_sparse_export(weights: dict[str, torch.Tensor], pattern: Pattern, directory: Path, name: str,
                        extra: dict | None = None, index_coding: str = "auto",
                        parameters: int | None = None) -> list[str]:
    """Write ``<name>.safetensors`` (packed weights, see :func:`framework.storage.save_packed`) and
    ``<name>_bpv.json`` (:func:`~framework.storage.bpv_report`: one :func:`~framework.storage.bpv_row` per weight,
    the selection's totals and, given the model's ``parameters``, the whole model's) into ``directory``; return the
    two file names."""
    packed = pack_sparse_weights(weights, pattern, index_coding)
    save_packed(packed, directory / f"{name}.safetensors")
    rows = [bpv_row(key, value) for key, value in packed.items()]
    report = bpv_report(rows, parameters, pattern=str(pattern), **(extra or {}))
    atomic_write_json(directory / f"{name}_bpv.json", report)
    return [f"{name}.safetensors", f"{name}_bpv.json"]
