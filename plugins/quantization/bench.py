"""Fake-quantization speed: :class:`FakeQuantizer` as QAT trains with it (:class:`LSQFakeQuantize`, nothing read
back to the host), against PyTorch's fused fake-quant kernels (which read their qparams back: a host-device sync
on a GPU) and LSQ written out in autograd operations.

Times forward + backward of one quantizer on the shapes a QAT run of the GPU base meets (per-channel and g32
weights, per-tensor activations of a batch, dynamic per-token KV-cache activations)::

    python -m plugins.quantization.bench --out fake_quant.json          # CUDA if present, else CPU
    python -m plugins.quantization.bench --device cpu --tokens 4096

Prints one table: milliseconds per forward + backward, the mean of back-to-back calls with one synchronisation at
the end (as in a training step). All three compute the same output and input gradient (``tests/test_quantization.py``
checks them against a hand-written LSQ).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from framework.io import atomic_write_json
from plugins.quantization.config import QuantSpec
from plugins.quantization.quantizer import FakeQuantizer


def composite_lsq(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                  quant_max: int, grad_factor: float) -> torch.Tensor:
    """LSQ from elementwise operations: rounding passed straight through, the scale's gradient scaled by
    ``grad_factor`` (``scale`` and ``zero_point`` are ``[rows, 1]``)."""
    scaled = scale * grad_factor + (scale - scale * grad_factor).detach()
    v = rows / scaled
    v = v + (torch.round(v) - v).detach()
    q = torch.clamp(v + zero_point, quant_min, quant_max)
    return (q - zero_point) * scaled


def _time(fn: Any, device: torch.device, repeats: int, warmup: int) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` back-to-back calls, synchronised once at the end: as in a training
    step, the host runs ahead of the GPU unless ``fn`` reads something back, so a read-back's stall is counted."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def cases(hidden: int, intermediate: int, tokens: int) -> list[tuple[str, QuantSpec, tuple[int, ...]]]:
    """(name, spec, tensor shape) for the quantizers of one Llama block's Linears."""
    return [
        ("weight W4 per channel (gate_proj)", QuantSpec(bits=4, granularity="channel"), (intermediate, hidden)),
        ("weight W4 g32 (down_proj)", QuantSpec(bits=4, granularity="group", group_size=32), (hidden, intermediate)),
        ("weight W2 per channel (q_proj)", QuantSpec(bits=2, granularity="channel"), (hidden, hidden)),
        ("input A8 per tensor (MLP input)", QuantSpec(bits=8, symmetric=False), (tokens, hidden)),
        ("input A8 per tensor (down_proj input)", QuantSpec(bits=8, symmetric=False), (tokens, intermediate)),
        ("KV A8 dynamic per token", QuantSpec(bits=8, granularity="token", mode="dynamic", symmetric=False),
         (tokens, hidden // 2)),
    ]


def measure(spec: QuantSpec, shape: tuple[int, ...], device: torch.device, repeats: int,
            warmup: int) -> dict[str, Any]:
    """Forward + backward time of one quantizer three ways: as training runs it (:class:`FakeQuantizer`), through
    PyTorch's fused fake-quant kernels, and as LSQ written out in autograd operations."""
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device)
    static = spec.mode == "static"
    quantizer = FakeQuantizer(spec, shape=tuple(shape) if static else None).to(device)
    if static:
        quantizer.calibrate(x * 0.8)
        quantizer.scale.requires_grad_(True)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    qmin, qmax = quantizer.quant_range
    factor = 1.0 / math.sqrt(quantizer._rows(x).shape[1] * qmax)

    def ours() -> None:
        quantizer(x).backward(grad)

    def torch_fused() -> None:
        scale, zero_point = quantizer.qparams(x)
        rows = quantizer._rows(x)
        if static:
            out = torch._fake_quantize_learnable_per_channel_affine(rows, scale.reshape(-1), zero_point.reshape(-1),
                                                                    0, qmin, qmax, factor)
        else:
            out = torch.fake_quantize_per_channel_affine(rows, scale.reshape(-1), zero_point.reshape(-1).int(), 0,
                                                         qmin, qmax)
        out.backward(quantizer._rows(grad))

    def composite() -> None:
        scale, zero_point = quantizer.qparams(x)
        rows = quantizer._rows(x)
        composite_lsq(rows, scale if static else scale.detach(), zero_point, qmin, qmax,
                      factor if static else 0.0).backward(quantizer._rows(grad))

    times = {name: _time(fn, device, repeats, warmup) for name, fn in
             (("ours", ours), ("torch_fused", torch_fused), ("composite", composite))}
    return {f"{name}_ms": seconds * 1e3 for name, seconds in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512, help="the GPU base's text hidden size")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=128 * 160, help="batch x sequence (the QAT runs' 128 x 160)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    rows = []
    for name, spec, shape in cases(opts.hidden, opts.intermediate, opts.tokens):
        rows.append({"quantizer": name, "shape": list(shape),
                     **measure(spec, shape, device, opts.repeats, opts.warmup)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "torch": torch.__version__, "timing": "mean of back-to-back calls, one sync at the end",
              "rows": rows}
    print(f"fake quantization, forward + backward, ms per call ({result['timing']}) on {name}")
    print(f"{'quantizer':40s} {'shape':>14s} {'vlmc':>8s} {'torch fused':>12s} {'composite':>10s}")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['quantizer']:40s} {shape:>14s} {row['ours_ms']:8.3f} {row['torch_fused_ms']:12.3f} "
              f"{row['composite_ms']:10.3f}")
    if opts.out:
        atomic_write_json(Path(opts.out), result)
    return result


if __name__ == "__main__":
    main()
