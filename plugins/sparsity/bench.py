"""2:4 semi-structured sparsity speed on a CUDA GPU: PyTorch's sparse kernels against dense bf16 matmuls.

Times ``F.linear`` with a dense weight and with the same weight pruned to 2:4 and converted by
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt and CUTLASS back-ends), for a model's own linear shapes and
for large shapes, then a whole model forward with every selected linear layer swapped to 2:4::

    python -m plugins.sparsity.bench --model experiments/models/llava-base-gpu.json --out sparse24.json

Prints one table; numbers are medians of CUDA-event timings after warm-up. Tokens ``M`` is batch x sequence.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

LARGE_SHAPES = [(4096, 4096, 16384), (8192, 8192, 16384), (4096, 11008, 8192), (2048, 2048, 8192)]


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs (the last dimension)."""
    groups = weight.abs().reshape(-1, 4)
    keep = groups.topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.reshape(weight.shape)


def cuda_time(fn: Any, repeats: int = 50, warmup: int = 10) -> float:
    """Median seconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def linear_row(out_features: int, in_features: int, tokens: int, dtype: torch.dtype, backend: str) -> dict[str, Any]:
    """Dense vs 2:4 time of y = x W^T for W [out, in] and x [tokens, in]."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
    weight = weight * two_four_mask(weight)
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    row: dict[str, Any] = {"out": out_features, "in": in_features, "tokens": tokens, "backend": backend}
    dense_s = cuda_time(lambda: F.linear(x, weight))
    row["dense_ms"] = dense_s * 1e3
    try:
        sparse = to_sparse_semi_structured(weight)
        err = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
        sparse_s = cuda_time(lambda: F.linear(x, sparse))
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # shape or back-end not supported
        row.update(sparse_ms=None, speedup=None, error=str(exc).splitlines()[0][:120])
        return row
    row.update(sparse_ms=sparse_s * 1e3, speedup=dense_s / sparse_s, max_abs_err=err)
    return row


def model_linear_shapes(model: nn.Module, include: str) -> list[tuple[str, int, int]]:
    from framework.selection import ModuleSelection

    selection = ModuleSelection(include=include, exclude="lm_head")
    seen: dict[tuple[int, int], str] = {}
    for name, module in selection.select(model).items():
        key = (module.out_features, module.in_features)
        seen.setdefault(key, name.split(".")[-1])
    return [(name, o, i) for (o, i), name in seen.items()]


def model_forward_row(model: nn.Module, include: str, tokens: tuple[int, int], dtype: torch.dtype,
                      backend: str) -> dict[str, Any]:
    """Forward time of the text tower with every selected Linear dense, then swapped to 2:4 (same values)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from framework.selection import ModuleSelection

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    text = text.to("cuda", dtype).eval()
    layers = ModuleSelection(include=include, exclude="lm_head").select(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.mul_(two_four_mask(layer.weight))
    batch, seq = tokens
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seq), device="cuda")
    with torch.no_grad():
        dense_s = cuda_time(lambda: text(input_ids=ids), repeats=20)
        reference = text(input_ids=ids).last_hidden_state
        originals = {name: layer.weight for name, layer in layers.items()}
        try:
            for layer in layers.values():
                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight), requires_grad=False)
            err = (text(input_ids=ids).last_hidden_state - reference).abs().max().item()
            sparse_s = cuda_time(lambda: text(input_ids=ids), repeats=20)
            result = {"sparse_ms": sparse_s * 1e3, "speedup": dense_s / sparse_s, "max_abs_err": err}
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            result = {"sparse_ms": None, "speedup": None, "error": str(exc).splitlines()[0][:120]}
        finally:
            for name, layer in layers.items():
                layer.weight = originals[name]
    return {"what": "text tower forward", "batch": batch, "seq": seq, "layers": len(layers), "backend": backend,
            "dense_ms": dense_s * 1e3, **result}


def format_rows(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in [c] + [b[i] for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(b, widths)) for b in body])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m plugins.sparsity.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="experiments/models/llava-base-gpu.json",
                        help="model spec, HF folder or hub id whose linear shapes are timed")
    parser.add_argument("--include", default="language_model", help="which linear layers (selection regex)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 2048, 40960],
                        help="token counts M (batch x sequence) for the model's shapes: decode, prefill, training")
    parser.add_argument("--batch", type=int, nargs=2, default=[256, 160], metavar=("BATCH", "SEQ"),
                        help="whole-model forward batch and sequence length")
    parser.add_argument("--backends", nargs="+", default=["cusparselt", "cutlass"])
    parser.add_argument("--out", help="write the rows as JSON here")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("plugins.sparsity.bench needs a CUDA GPU (2:4 kernels are GPU-only)")

    from framework.models import load_vlm

    dtype = torch.bfloat16
    model = load_vlm(opts.model).model
    shapes = model_linear_shapes(model, opts.include)
    kernel_rows = []
    for backend in opts.backends:
        for name, out_features, in_features in shapes:
            for tokens in opts.tokens:
                kernel_rows.append({"shape": name, **linear_row(out_features, in_features, tokens, dtype, backend)})
        for out_features, in_features, tokens in LARGE_SHAPES:
            kernel_rows.append({"shape": "large", **linear_row(out_features, in_features, tokens, dtype, backend)})
    model_rows = [model_forward_row(load_vlm(opts.model).model, opts.include, tuple(opts.batch), dtype, backend)
                  for backend in opts.backends]
    print(f"2:4 vs dense, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(format_rows(kernel_rows, ["shape", "out", "in", "tokens", "backend", "dense_ms", "sparse_ms", "speedup",
                                    "error"]))
    print(format_rows(model_rows, ["what", "batch", "seq", "layers", "backend", "dense_ms", "sparse_ms", "speedup",
                                   "max_abs_err", "error"]))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": opts.model,
               "kernels": kernel_rows, "model_forward": model_rows}
    if opts.out:
        from pathlib import Path

        from framework.io import atomic_write_json

        atomic_write_json(Path(opts.out), results)
    return results


if __name__ == "__main__":
    main()
