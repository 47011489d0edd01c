"""Forward latency of a dense and a pruned model on the current device (what structured pruning buys)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn


@torch.no_grad()
def forward_latency(model: nn.Module, batch_size: int = 8, seq_len: int = 128, repeats: int = 20, warmup: int = 3,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Median wall time of one text-only forward (``input_ids`` of ``batch_size x seq_len``), CUDA synchronised.

    Returns:
        ``{"median_ms", "min_ms", "params", "batch_size", "seq_len"}``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device=device, dtype=dtype).eval()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0), device="cpu").to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "params": sum(p.numel() for p in model.parameters()), "batch_size": batch_size, "seq_len": seq_len}


def compare_latency(dense: nn.Module, pruned: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """:func:`forward_latency` of both models and the speed-up of the pruned one."""
    a, b = forward_latency(dense, **kwargs), forward_latency(pruned, **kwargs)
    return {"dense": a, "pruned": b, "speedup": a["median_ms"] / b["median_ms"]}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """``python -m plugins.l0_pruning.latency --dense A --pruned B [--pruned C ...]``: a table of forward latency.

    Models are spec JSONs, HF folders (e.g. ``vlmc export`` outputs) or hub ids; latency depends on shapes, not
    weights, so a pruned shape's spec JSON (``plugins.l0_pruning.spec``) measures the same as the trained export.
    """
    import argparse
    import json
    from pathlib import Path

    from framework.io import atomic_write_json
    from framework.models import load_vlm

    parser = argparse.ArgumentParser(prog="python -m plugins.l0_pruning.latency",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True)
    parser.add_argument("--pruned", action="append", required=True)
    parser.add_argument("--shapes", nargs="+", default=["1x128", "32x160", "256x160"], help="BATCHxSEQ forwards")
    parser.add_argument("--out", help="write the rows as JSON here")
    opts = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dense = load_vlm(opts.dense).model
    rows = []
    for pruned_name in opts.pruned:
        pruned = load_vlm(pruned_name).model
        for shape in opts.shapes:
            batch, seq = (int(x) for x in shape.split("x"))
            result = compare_latency(dense, pruned, batch_size=batch, seq_len=seq, device=device, dtype=dtype)
            rows.append({"pruned": pruned_name, "batch": batch, "seq": seq, "dense_ms": result["dense"]["median_ms"],
                         "pruned_ms": result["pruned"]["median_ms"], "speedup": result["speedup"],
                         "dense_params": result["dense"]["params"], "pruned_params": result["pruned"]["params"]})
            print(json.dumps(rows[-1]), flush=True)
    if opts.out:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        atomic_write_json(Path(opts.out), {"device": name, "dtype": str(dtype), "dense": opts.dense, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
