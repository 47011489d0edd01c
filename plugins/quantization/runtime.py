"""Integer reference runtime: the exported text decoder run from integer codes and the exported encodings.

It loads an export folder (HF ``config.json`` and ``model.safetensors``, ``<name>.encodings``,
``<name>_int_weights.safetensors``) and runs the language model of a Llama or Qwen2 decoder (the text tower of
a LLaVA-style VLM, or a bare causal LM) the way a device runtime would: every quantized Linear multiplies
integer activation codes by integer weight codes with int64 accumulators, per block of a group when weights or
activations are grouped, then applies ``scale_x * scale_w``; static activations use the exported scale and
offset, dynamic ones compute theirs per token / group with the same formulas as training. Quantized outputs
(e.g. the KV cache, the outputs of ``k_proj`` / ``v_proj``) are stored as codes and dequantized. Norms,
rotary embeddings, softmax and SiLU run in float32, as in the fake-quant model.

Scope: the vision tower and projector are not run here. Callers pass ``inputs_embeds`` produced by the
(fake-quant) VLM, i.e. token embeddings with the image features (projector output, quantized when the
projector's output has an encoding) merged in; text-only inputs may pass ``input_ids``. Qwen2-VL's M-RoPE and
sliding-window attention are not implemented (the runtime refuses such configs).

Example::

    runtime = IntegerRuntime("exports/qat_w4a8")
    logits = runtime(inputs_embeds=embeds, attention_mask=mask)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from framework.storage import load_unpacked
from plugins.quantization.encodings import decode_entries
from plugins.quantization.quantizer import fake_quantize, qparams_from_range, quantize_codes

SUPPORTED = ("llama", "qwen2")


class _Quantized:
    """An integer tensor ``(codes - zero_point)`` in row form with its per-row (per-block) scales."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, block: int) -> None:
        self.values, self.scale, self.block = values, scale, block  # values int64 [rows, in]; scale [rows, in/block]


class IntegerRuntime:
    """Run an exported quantized text decoder with integer weights and activations.

    Args:
        directory: an export folder written by ``vlmc export`` / :func:`framework.export.export_model` with a
            quantization plugin.

    Raises:
        FileNotFoundError: no ``.encodings`` file in ``directory``.
        NotImplementedError: a text model other than Llama / Qwen2, M-RoPE or sliding-window attention.
        ValueError: a quantized weight without integer codes, or codes whose shape does not match the encoding.
    """

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        text = config.get("text_config", config)
        if text.get("model_type") not in SUPPORTED:
            raise NotImplementedError(f"IntegerRuntime runs {', '.join(SUPPORTED)} decoders, not "
                                      f"{text.get('model_type')!r}")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default" or "mrope_section" in rope or text.get("use_sliding_window"):
            raise NotImplementedError("IntegerRuntime supports the default rotary embedding without sliding windows")
        self.config = text
        self.floats = _float_state(directory)
        files = sorted(directory.glob("*.encodings"))
        if not files:
            raise FileNotFoundError(f"{directory} has no .encodings file; export with a quantization plugin")
        self.params: dict[str, Any] = {}
        self.acts: dict[str, Any] = {}
        self.dynamic: dict[str, Any] = {}
        self.layouts: dict[str, Any] = {}
        self.codes: dict[str, torch.Tensor] = {}
        for file in files:
            enc = json.loads(file.read_text())
            self.params.update(enc["param_encodings"])
            self.acts.update(enc["activation_encodings"])
            self.dynamic.update(enc.get("vlmc", {}).get("dynamic_activations", {}))
            self.layouts.update(enc.get("vlmc", {}).get("layouts", {}))
            codes_file = file.with_name(file.name[: -len(".encodings")] + "_int_weights.safetensors")
            self.codes.update(load_unpacked(codes_file))
        embed = [k for k in self.floats if k.endswith("embed_tokens.weight")]
        if len(embed) != 1:
            raise ValueError(f"expected one embed_tokens weight in model.safetensors, found {embed}")
        self.prefix = embed[0][: -len("embed_tokens.weight")]
        self.head = "lm_head" if "lm_head.weight" in self.floats or "lm_head.weight" in self.params else None
        self.weights = {name: self._int_weight(name) for name in self.params}
        from transformers import AutoConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        hf_config = AutoConfig.from_pretrained(directory)
        self.rotary = LlamaRotaryEmbedding(config=getattr(hf_config, "text_config", hf_config))

    # ------------------------------------------------------------------ tensors
    def _int_weight(self, name: str) -> _Quantized:
        if name not in self.codes:
            raise ValueError(f"{name} has a param encoding but no integer codes in the export")
        codes = self.codes[name].to(torch.int64)
        scale, zero_point, _, _ = decode_entries(name, self.params[name])
        out, width = codes.shape
        count = scale.numel()
        if count not in (1, out) and (count % out or width % (count // out)):
            raise ValueError(f"{name}: {count} encodings do not fit a {tuple(codes.shape)} weight")
        per_row = 1 if count in (1, out) else count // out
        block = width // per_row
        shape = (1, 1) if count == 1 else (out, per_row)
        values = codes - zero_point.reshape(shape).repeat_interleave(block, dim=1).to(torch.int64)
        return _Quantized(values, scale.reshape(shape).double(), block)

    def _quantize_input(self, x: torch.Tensor, name: str) -> _Quantized | None:
        """Integer codes of an activation ``[rows, in]`` at ``name``, or ``None`` when it stays float."""
        if name in self.acts:
            scale, zero_point, bits, sym = decode_entries(name, self.acts[name])
            qmin, qmax = _grid(bits, sym)
            codes = quantize_codes(x, scale.reshape(1, 1), zero_point.reshape(1, 1), qmin, qmax)
            return _Quantized(codes - zero_point.to(torch.int64).reshape(1, 1), scale.double().reshape(1, 1),
                              x.shape[-1])
        if name in self.dynamic:
            entry = self.dynamic[name]
            bits, sym = int(entry["bitwidth"]), entry["is_symmetric"] == "True"
            qmin, qmax = _grid(bits, sym)
            block = {"tensor": x.numel(), "token": x.shape[-1], "group": entry.get("group_size")}[entry["granularity"]]
            rows = x.reshape(-1, block)
            scale, zero_point = qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax, sym)
            codes = quantize_codes(rows, scale[:, None], zero_point[:, None], qmin, qmax)
            values = (codes - zero_point[:, None].to(torch.int64)).reshape(x.shape)
            if entry["granularity"] == "tensor":
                return _Quantized(values, scale.double().reshape(1, 1).expand(x.shape[0], 1), x.shape[-1])
            return _Quantized(values, scale.double().reshape(x.shape[0], x.shape[-1] // block), block)
        return None

    def _fake_quant_output(self, y: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.acts:
            scale, zero_point, bits, sym = decode_entries(name, self.acts[name])
            return fake_quantize(y, scale.reshape(1, 1), zero_point.reshape(1, 1), *_grid(bits, sym))
        if name in self.dynamic:
            entry = self.dynamic[name]
            bits, sym = int(entry["bitwidth"]), entry["is_symmetric"] == "True"
            qmin, qmax = _grid(bits, sym)
            block = {"tensor": y.numel(), "token": y.shape[-1], "group": entry.get("group_size")}[entry["granularity"]]
            rows = y.reshape(-1, block)
            scale, zero_point = qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax, sym)
            return fake_quantize(rows, scale[:, None], zero_point[:, None], qmin, qmax).reshape(y.shape)
        return y

    def linear(self, x: torch.Tensor, module: str) -> torch.Tensor:
        """``module``'s Linear on ``x`` (``[..., in]``): integer matmul where both sides are quantized."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        qx = self._quantize_input(x, f"{module}.input")
        qw = self.weights.get(f"{module}.weight")
        if qw is not None and qx is not None:
            y = _int_matmul(qx, qw)
        else:
            if qx is not None:  # float weight, quantized input: the dequantized input
                x = (qx.values.double() * qx.scale.repeat_interleave(qx.block, dim=1)).float()
            weight = self.floats[f"{module}.weight"] if qw is None else \
                (qw.values.double() * qw.scale.repeat_interleave(qw.block, dim=1)).float()
            y = x @ weight.t()
        bias = self.floats.get(f"{module}.bias")
        if bias is not None:
            y = y + bias
        y = self._fake_quant_output(y, f"{module}.output")
        return y.reshape(*shape[:-1], y.shape[-1])

    # ------------------------------------------------------------------ model
    def _norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.floats[key] * (x * torch.rsqrt(variance + self.config.get("rms_norm_eps", 1e-6)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` (float32) for token ids or merged input embeddings.

        Positions run 0..seq-1 on every row (as the HF forward without a cache does); ``attention_mask`` masks
        padded keys. Rows of padded queries are meaningless, as in the HF model.
        """
        c, p = self.config, self.prefix
        h = self.floats[f"{p}embed_tokens.weight"][input_ids] if inputs_embeds is None else inputs_embeds.float()
        batch, seq, _ = h.shape
        heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
        dim = c.get("head_dim") or c["hidden_size"] // heads
        positions = torch.arange(seq)[None].expand(batch, -1)
        cos, sin = self.rotary(h, positions)
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        for i in range(c["num_hidden_layers"]):
            layer = f"{p}layers.{i}."
            x = self._norm(h, f"{layer}input_layernorm.weight")
            q = self.linear(x, f"{layer}self_attn.q_proj").view(batch, seq, heads, dim).transpose(1, 2)
            k = self.linear(x, f"{layer}self_attn.k_proj").view(batch, seq, kv_heads, dim).transpose(1, 2)
            v = self.linear(x, f"{layer}self_attn.v_proj").view(batch, seq, kv_heads, dim).transpose(1, 2)
            q, k = q * cos[:, None] + _rotate_half(q) * sin[:, None], k * cos[:, None] + _rotate_half(k) * sin[:, None]
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            scores = (q @ k.transpose(2, 3)) / math.sqrt(dim)
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
            attn = (F.softmax(scores, dim=-1, dtype=torch.float32) @ v).transpose(1, 2).reshape(batch, seq, -1)
            h = h + self.linear(attn, f"{layer}self_attn.o_proj")
            x = self._norm(h, f"{layer}post_attention_layernorm.weight")
            gate = self.linear(x, f"{layer}mlp.gate_proj")
            h = h + self.linear(F.silu(gate) * self.linear(x, f"{layer}mlp.up_proj"), f"{layer}mlp.down_proj")
        h = self._norm(h, f"{p}norm.weight")
        if self.head is None:  # tied embeddings
            return h @ self.floats[f"{p}embed_tokens.weight"].t()
        return self.linear(h, self.head)


def _float_state(directory: Path) -> dict[str, torch.Tensor]:
    """The exported float tensors under the in-memory module names the encodings use (HF may save some models
    under legacy checkpoint names, so the state dict of the loaded model is the reference)."""
    import transformers

    for auto in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        try:
            model = getattr(transformers, auto).from_pretrained(directory, dtype=torch.float32)
        except ValueError:
            continue
        return {k: v.detach() for k, v in model.state_dict().items()}
    raise ValueError(f"{directory} holds neither an image-text-to-text nor a causal LM")


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _int_matmul(x: _Quantized, w: _Quantized) -> torch.Tensor:
    """``sum_blocks (x_int @ w_int^T) * scale_x * scale_w`` with int64 accumulators, in float32."""
    rows, width = x.values.shape
    block = math.gcd(x.block, w.block)
    blocks = width // block
    xv = x.values.reshape(rows, blocks, block)
    wv = w.values.reshape(w.values.shape[0], blocks, block)
    partial = torch.einsum("rkb,okb->rok", xv, wv)  # int64, exact
    sx = x.scale.repeat_interleave(x.block // block, dim=1).expand(rows, blocks)
    sw = w.scale.repeat_interleave(w.block // block, dim=1).expand(w.values.shape[0], blocks)
    if blocks == 1:
        return (partial[..., 0].double() * sx * sw.t()).float()
    return (partial.double() * sx[:, None, :] * sw[None]).sum(-1).float()


# ---------------------------------------------------------------------------------------------- agreement check
def check_export(folder: str | Path, tasks: list[str], samples: int = 64, *, image_size: int = 128,
                 max_length: int = 512, batch_size: int = 16, seed: int = 0, margin: float = 1e-3) -> dict[str, Any]:
    """Run an export both ways, the fake-quant model (its encodings fixed) and :class:`IntegerRuntime`, on the
    validation samples of ``tasks`` and compare their logits.

    The samples are the ones ``vlmc validate`` uses (seed ``seed``), prompt and answer, so agreement is counted at
    every position the loss sees (``answer``) and at every non-padding position (``all``). ``decided`` counts only
    positions whose fake-quant top-2 logits differ by more than ``margin``, where float rounding cannot flip the
    argmax.

    Returns:
        ``{"tasks": {task: row}, "overall": row}``, each row with ``positions``, ``top1_answer``, ``top1_all``,
        ``top1_decided``, ``decided_fraction``, ``max_abs_diff``, ``max_rel_diff``, and over positions (each
        position's largest logit difference) ``median_position_diff`` and ``share_positions_above_1e-3``.
    """
    from framework.data.datamodule import VAL_SEED_OFFSET
    from framework.data.tasks import make_task
    from framework.metrics import Top1Agreement
    from framework.processing import VLMProcessor, family_for
    from plugins.quantization.adapters import load_quantized_base

    loaded = load_quantized_base(folder, [])
    model = loaded.model.float().eval()
    processor = VLMProcessor(family_for(model.config, loaded.tokenizer, loaded.image_processor), max_length)
    runtime = IntegerRuntime(folder)
    language_model = getattr(getattr(model, "model", model), "language_model", None) or model.model
    captured: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else \
            module.embed_tokens(kwargs.get("input_ids", args[0] if args else None))

    handle = language_model.register_forward_pre_hook(grab, with_kwargs=True)
    rows: dict[str, dict[str, Any]] = {}
    totals = {key: Top1Agreement() for key in ("answer", "all", "decided")}
    overall: dict[str, Any] = {"positions": 0, "decided": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0,
                               "position_diffs": []}
    try:
        for task_name in tasks:
            task = make_task(task_name, seed=seed + VAL_SEED_OFFSET, image_size=image_size)
            metrics = {key: Top1Agreement() for key in ("answer", "all", "decided")}
            stats: dict[str, Any] = {"positions": 0, "decided": 0, "max_abs_diff": 0.0, "max_rel_diff": 0.0,
                                     "position_diffs": []}
            for start in range(0, samples, batch_size):
                batch = processor.encode([task[i] for i in range(start, min(samples, start + batch_size))])
                labels = batch.pop("labels")
                batch.pop("num_answer_tokens")
                with torch.no_grad():
                    fake = model(**batch).logits.float()
                integer = runtime(inputs_embeds=captured["embeds"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].bool()
                # The logits at position t predict token t+1: the answer positions are those before each label.
                answer = torch.zeros_like(mask)
                answer[:, :-1] = labels[:, 1:] != -100
                top2 = fake.topk(2, dim=-1).values
                decided = mask & (top2[..., 0] - top2[..., 1] > margin)
                for key, where in (("answer", answer), ("all", mask), ("decided", decided)):
                    metrics[key].update(integer, fake, where)
                    totals[key].update(integer, fake, where)
                diff = (integer[mask] - fake[mask]).abs()
                scale = float(fake[mask].abs().max())
                per_position = diff.amax(dim=-1)
                for target in (stats, overall):
                    target["position_diffs"].append(per_position)
                    target["positions"] += int(mask.sum())
                    target["decided"] += int(decided.sum())
                    target["max_abs_diff"] = max(target["max_abs_diff"], float(diff.max()))
                    target["max_rel_diff"] = max(target["max_rel_diff"], float(diff.max()) / max(scale, 1e-12))
            rows[task_name] = _agreement_row(metrics, stats)
    finally:
        handle.remove()
    return {"export": str(folder), "samples": samples, "tasks": rows, "overall": _agreement_row(totals, overall)}


def _agreement_row(metrics: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    # Most positions differ by float rounding only; a flipped activation code shows as a position far above it.
    diffs = torch.cat(stats["position_diffs"]) if stats["position_diffs"] else torch.zeros(1)
    return {"positions": stats["positions"], "top1_answer": float(metrics["answer"].compute()),
            "top1_all": float(metrics["all"].compute()), "top1_decided": float(metrics["decided"].compute()),
            "decided_fraction": stats["decided"] / max(1, stats["positions"]),
            "max_abs_diff": stats["max_abs_diff"], "max_rel_diff": stats["max_rel_diff"],
            "median_position_diff": float(diffs.median()),
            "share_positions_above_1e-3": float((diffs > 1e-3).float().mean())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m plugins.quantization.runtime EXPORT``: fake-quant model vs integer runtime on validation samples."""
    import argparse

    from framework.io import atomic_write_json

    parser = argparse.ArgumentParser(prog="python -m plugins.quantization.runtime", description=check_export.__doc__
                                     .split("\n\n")[0])
    parser.add_argument("export", help="export folder with model.safetensors, *.encodings, *_int_weights")
    parser.add_argument("--tasks", nargs="+", default=["autofill", "caption"])
    parser.add_argument("--samples", type=int, default=64, help="validation samples per task")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="the data seed of the run (validation samples)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", help="also write the result as JSON here")
    opts = parser.parse_args(argv)
    if opts.samples < 1 or opts.batch_size < 1:
        raise SystemExit("--samples / --batch_size: must be >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = check_export(opts.export, opts.tasks, opts.samples, image_size=opts.image_size,
                          max_length=opts.max_length, batch_size=opts.batch_size, seed=opts.seed)
    print(f"{'task':<10} {'positions':>9} {'top1 answer':>11} {'top1 all':>9} {'decided':>8} {'top1 decided':>12} "
          f"{'max |diff|':>10} {'rel':>9} {'median':>9} {'>1e-3':>6}")
    for name, row in [*result["tasks"].items(), ("overall", result["overall"])]:
        print(f"{name:<10} {row['positions']:>9} {row['top1_answer']:>11.4f} {row['top1_all']:>9.4f} "
              f"{row['decided_fraction']:>8.3f} {row['top1_decided']:>12.4f} {row['max_abs_diff']:>10.3g} "
              f"{row['max_rel_diff']:>9.2g} {row['median_position_diff']:>9.2g} "
              f"{row['share_positions_above_1e-3']:>6.3f}")
    if opts.out:
        atomic_write_json(opts.out, result)
    return result


if __name__ == "__main__":
    main()
