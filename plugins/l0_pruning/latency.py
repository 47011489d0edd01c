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
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
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
