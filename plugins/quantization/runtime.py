"""Integer reference runtime: the exported text decoder run from integer codes and the exported encodings.

It loads an export folder (HF ``config.json`` and ``model.safetensors``, ``<name>.encodings``,
``<name>_int_weights.safetensors``) and runs the language model of a Llama or Qwen2 decoder (the text tower of
a LLaVA-style VLM, or a bare causal LM) the way a device runtime would: every quantized Linear multiplies
integer activation codes by integer weight codes with exact accumulators, per block of a group when weights or
activations are grouped, then applies ``scale_x * scale_w`` (:func:`~plugins.quantization.quantizer.integer_linear`);
static activations use the exported scale and offset, dynamic ones compute theirs per token / group with the same
formulas as training. Quantized outputs (e.g. the KV cache, the outputs of ``k_proj`` / ``v_proj``) are rounded
to their codes and dequantized.

Everything else runs in float32 with the op order of the installed transformers' Llama / Qwen2 forward with its
default ``sdpa`` attention: RMSNorm, the default rotary embedding (cos / sin from ``inv_freq`` as HF computes
them), ``scaled_dot_product_attention`` with HF's mask form (``is_causal`` and grouped heads without padding, a
boolean mask and repeated KV heads with it), SiLU times up, residual adds, ``F.linear`` for float layers. So
against the fake-quant model evaluated in integer-exact mode
(:func:`~plugins.quantization.placement.integer_exact_eval`) the logits are equal bit for bit on CPU; against the ordinary fake-quant model (float matmuls of dequantized
values) they differ by float rounding, which can move an activation across a code boundary and flip the argmax
where the top two logits nearly tie.

Quantized token embeddings are looked up from their integer table (code minus offset, times the row's scale).

Scope: the vision tower and projector are not run here. Callers pass ``inputs_embeds`` produced by the
(fake-quant) VLM, i.e. token embeddings with the image features (projector output, quantized when the
projector's output has an encoding) merged in; text-only inputs may pass ``input_ids``. Qwen2-VL's M-RoPE and
sliding-window attention are not implemented (the runtime refuses such configs).

Example::

    runtime = IntegerRuntime("exports/qat_w4a8")
    logits = runtime(inputs_embeds=embeds, attention_mask=mask)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from framework.storage import load_unpacked
from plugins.quantization.encodings import decode_entries
from plugins.quantization.quantizer import (
    IntegerRows,
    fake_quantize,
    integer_linear,
    integer_rows,
    qparams_from_range,
    quantize_codes,
)

SUPPORTED = ("llama", "qwen2")


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
        self.shared: dict[str, str] = {}  # tensor -> the tensor whose quantizer (and, for weights, codes) it shares
        for file in files:
            enc = json.loads(file.read_text())
            self.params.update(enc["param_encodings"])
            self.acts.update(enc["activation_encodings"])
            self.dynamic.update(enc.get("vlmc", {}).get("dynamic_activations", {}))
            self.layouts.update(enc.get("vlmc", {}).get("layouts", {}))
            self.shared.update(enc.get("vlmc", {}).get("shared_activations", {}))
            codes_file = file.with_name(file.name[: -len(".encodings")] + "_int_weights.safetensors")
            self.codes.update(load_unpacked(codes_file))
        embed = [k for k in self.floats if k.endswith("embed_tokens.weight")]
        if len(embed) != 1:
            raise ValueError(f"expected one embed_tokens weight in model.safetensors, found {embed}")
        self.prefix = embed[0][: -len("embed_tokens.weight")]
        self.head = "lm_head" if "lm_head.weight" in self.floats or "lm_head.weight" in self.params else None
        self.weights = {name: self._int_weight(name) for name in self.params}
        rope = text.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))

    # ------------------------------------------------------------------ tensors
    def _int_weight(self, name: str) -> IntegerRows:
        if name not in self.codes and self.shared.get(name) in self.codes:  # a tied weight, stored once
            self.codes[name] = self.codes[self.shared[name]]
        if name not in self.codes:
            raise ValueError(f"{name} has a param encoding but no integer codes in the export")
        codes = self.codes[name].to(torch.int64)
        scale, zero_point, _, _ = decode_entries(name, self.params[name])
        if codes.dim() > 2 and self.layouts.get(name, {}).get("granularity") in ("tensor", "channel"):
            # A convolution's kernel as the matrix of its unfolded patches ([out, in x kernel]), as a device runs it.
            codes = codes.reshape(codes.shape[0], -1)
        if codes.dim() != 2:
            raise ValueError(f"{name}: integer codes of shape {tuple(codes.shape)}; a Linear or Embedding weight "
                             "is 2-D, a convolution's is quantized per tensor or channel")
        try:
            return integer_rows(codes, zero_point, scale)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def _quantize_input(self, x: torch.Tensor, name: str) -> IntegerRows | None:
        """Integer codes of an activation ``[rows, in]`` at ``name``, or ``None`` when it stays float."""
        if name in self.acts:
            scale, zero_point, bits, sym = decode_entries(name, self.acts[name])
            scale, zero_point = scale.reshape(1, 1), zero_point.reshape(1, 1)
            return integer_rows(quantize_codes(x, scale, zero_point, *_grid(bits, sym)), zero_point, scale)
        if name in self.dynamic:
            rows, qmin, qmax, scale, zero_point = self._dynamic_qparams(x, name)
            codes = quantize_codes(rows, scale, zero_point, qmin, qmax).reshape(x.shape)
            return integer_rows(codes, zero_point, scale)
        return None

    def _dynamic_qparams(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int, torch.Tensor,
                                                                     torch.Tensor]:
        """``x`` in rows of one scale each, the grid, and per-row ``[rows, 1]`` scale and zero point."""
        entry = self.dynamic[name]
        bits, sym = int(entry["bitwidth"]), entry["is_symmetric"] == "True"
        qmin, qmax = _grid(bits, sym)
        block = {"tensor": x.numel(), "token": x.shape[-1], "group": entry.get("group_size")}[entry["granularity"]]
        rows = x.reshape(-1, block)
        scale, zero_point = qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), qmin, qmax, sym)
        return rows, qmin, qmax, scale[:, None], zero_point[:, None]

    def _fake_quant_output(self, y: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.acts:
            scale, zero_point, bits, sym = decode_entries(name, self.acts[name])
            return fake_quantize(y, scale.reshape(1, 1), zero_point.reshape(1, 1), *_grid(bits, sym))
        if name in self.dynamic:
            rows, qmin, qmax, scale, zero_point = self._dynamic_qparams(y, name)
            return fake_quantize(rows, scale, zero_point, qmin, qmax).reshape(y.shape)
        return y

    def linear(self, x: torch.Tensor, module: str) -> torch.Tensor:
        """``module``'s Linear on ``x`` (``[..., in]``): integer matmul where both sides are quantized, else
        ``F.linear`` of the (dequantized) float tensors, as the fake-quant model computes it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        qx = self._quantize_input(x, f"{module}.input")
        qw = self.weights.get(f"{module}.weight")
        bias = self.floats.get(f"{module}.bias")
        if qw is not None and qx is not None:
            y = integer_linear(qx, qw)
            if bias is not None:
                y = y + bias
        else:
            if qx is not None:  # float weight, quantized input: the dequantized input (exact in float64)
                x = (qx.values.double() * qx.scale.repeat_interleave(qx.block, dim=1)).float()
            weight = self.floats[f"{module}.weight"] if qw is None else \
                (qw.values.double() * qw.scale.repeat_interleave(qw.block, dim=1)).float()
            y = F.linear(x, weight, bias)
        y = self._fake_quant_output(y, f"{module}.output")
        return y.reshape(*shape[:-1], y.shape[-1])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: rows of the integer table times their scales where the table is quantized (the
        fake-quant lookup's values exactly), else rows of the float table."""
        name = f"{self.prefix}embed_tokens.weight"
        table = self.weights.get(name)
        if table is None:
            return F.embedding(input_ids, self.floats[name])
        scale = table.scale.expand(table.values.shape[0], -1)[input_ids].repeat_interleave(table.block, dim=-1)
        return (table.values[input_ids].double() * scale).float()

    # ------------------------------------------------------------------ float parts, in HF's op order
    def _norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """``LlamaRMSNorm`` / ``Qwen2RMSNorm``."""
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.config.get("rms_norm_eps", 1e-6))
        return self.floats[key] * x

    def _rotary(self, seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[1, seq, dim]`` as ``LlamaRotaryEmbedding`` computes them (default rope, float32)."""
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = torch.arange(seq)[None][..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * 1.0, emb.sin() * 1.0  # attention_scaling is 1.0 for the default rope

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
        """HF's ``sdpa_attention_forward`` for a prefill without cache: without a mask, ``is_causal`` and SDPA's
        own grouped-query heads; with one, KV heads repeated (expand + reshape) and the boolean mask."""
        groups = q.shape[1] // k.shape[1]
        kwargs = {}
        if groups > 1:
            if mask is None and k.shape[-1] == v.shape[-1] <= 256:
                kwargs["enable_gqa"] = True
            else:
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                             is_causal=mask is None and q.shape[2] > 1, **kwargs)
        return out.transpose(1, 2).contiguous()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` (float32) for token ids or merged input embeddings.

        Positions run 0..seq-1 on every row (as the HF forward without a cache does); ``attention_mask`` masks
        padded keys. Rows of padded queries are meaningless, as in the HF model.
        """
        c, p = self.config, self.prefix
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.float()
        batch, seq, _ = h.shape
        heads = c["num_attention_heads"]
        dim = c.get("head_dim") or c["hidden_size"] // heads
        cos, sin = self._rotary(seq, dim)
        cos, sin = cos[:, None], sin[:, None]
        # HF's create_causal_mask: no mask (SDPA's is_causal) unless some key is padding, then a boolean
        # [batch, 1, q, kv] mask `kv <= q and not padding`.
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            causal = torch.arange(seq)[None, None, None, :] <= torch.arange(seq)[None, None, :, None]
            mask = (causal & attention_mask.bool()[:, None, None, :]).expand(batch, -1, seq, seq)
        for i in range(c["num_hidden_layers"]):
            layer = f"{p}layers.{i}."
            residual = h
            x = self._norm(h, f"{layer}input_layernorm.weight")
            hidden_shape = (batch, seq, -1, dim)
            q = self.linear(x, f"{layer}self_attn.q_proj").view(hidden_shape).transpose(1, 2)
            k = self.linear(x, f"{layer}self_attn.k_proj").view(hidden_shape).transpose(1, 2)
            v = self.linear(x, f"{layer}self_attn.v_proj").view(hidden_shape).transpose(1, 2)
            q, k = (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
            attn = self._attention(q, k, v, mask, dim ** -0.5).reshape(batch, seq, -1).contiguous()
            h = residual + self.linear(attn, f"{layer}self_attn.o_proj")
            residual = h
            x = self._norm(h, f"{layer}post_attention_layernorm.weight")
            gate = self.linear(x, f"{layer}mlp.gate_proj")
            h = residual + self.linear(F.silu(gate) * self.linear(x, f"{layer}mlp.up_proj"), f"{layer}mlp.down_proj")
        h = self._norm(h, f"{p}norm.weight")
        if self.head is None:  # tied embeddings
            return F.linear(h, self.floats[f"{p}embed_tokens.weight"])
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
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, kv_heads * groups, seq, dim)


# ---------------------------------------------------------------------------------------------- agreement check
def check_export(folder: str | Path, tasks: list[str], samples: int = 64, *, image_size: int = 128,
                 max_length: int = 512, batch_size: int = 16, seed: int = 0, margin: float = 1e-3,
                 exact: bool = True) -> dict[str, Any]:
    """Run an export both ways, the fake-quant model (its encodings fixed) and :class:`IntegerRuntime`, on the
    validation samples of ``tasks`` and compare their logits.

    With ``exact`` (the default) the fake-quant model runs in integer-exact mode
    (:func:`~plugins.quantization.placement.integer_exact_eval`): its quantized Linear layers compute what the
    runtime computes, so agreement is 1.0 and the logits are equal bit for bit (``share_positions_identical``
    1.0); anything less is a bug in one of the two. Without it, the ordinary fake-quant model (float matmuls of
    dequantized values, the float simulation that training uses) is compared with the integer runtime: the two
    differ by float rounding, and where that moves an activation across a code boundary the difference grows and
    near-tied top-2 logits can flip.

    The samples are the ones ``vlmc validate`` uses (seed ``seed``), prompt and answer, so agreement is counted at
    every position the loss sees (``answer``) and at every non-padding position (``all``). ``decided`` counts only
    positions whose fake-quant top-2 logits differ by more than ``margin``, where float rounding cannot flip the
    argmax.

    Returns:
        ``{"export", "samples", "mode", "tasks": {task: row}, "overall": row}`` (``mode``: ``integer_exact`` or
        ``float_simulation``), each row with ``positions``, ``top1_answer``, ``top1_all``, ``top1_decided``,
        ``decided_fraction``, ``max_abs_diff``, ``max_rel_diff``, and over positions (each position's largest
        logit difference) ``median_position_diff``, ``share_positions_above_1e-3`` and
        ``share_positions_identical`` (every logit bit-equal).
    """
    from framework.data.datamodule import VAL_SEED_OFFSET
    from framework.data.tasks import make_task
    from framework.metrics import Top1Agreement
    from framework.processing import VLMProcessor, family_for
    from plugins.quantization.adapters import load_quantized_base
    from plugins.quantization.placement import integer_exact_eval

    if not isinstance(exact, bool):
        raise TypeError(f"exact: must be true or false, got {exact!r}")
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
    overall: dict[str, Any] = {"positions": 0, "decided": 0, "identical": 0, "max_abs_diff": 0.0,
                               "max_rel_diff": 0.0, "position_diffs": []}
    try:
        for task_name in tasks:
            task = make_task(task_name, seed=seed + VAL_SEED_OFFSET, image_size=image_size)
            metrics = {key: Top1Agreement() for key in ("answer", "all", "decided")}
            stats: dict[str, Any] = {"positions": 0, "decided": 0, "identical": 0, "max_abs_diff": 0.0,
                                     "max_rel_diff": 0.0, "position_diffs": []}
            for start in range(0, samples, batch_size):
                batch = processor.encode([task[i] for i in range(start, min(samples, start + batch_size))])
                labels = batch.pop("labels")
                batch.pop("num_answer_tokens")
                with torch.no_grad(), integer_exact_eval(model) if exact else contextlib.nullcontext():
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
                    target["identical"] += int((integer[mask] == fake[mask]).all(dim=-1).sum())
                    target["max_abs_diff"] = max(target["max_abs_diff"], float(diff.max()))
                    target["max_rel_diff"] = max(target["max_rel_diff"], float(diff.max()) / max(scale, 1e-12))
            rows[task_name] = _agreement_row(metrics, stats)
    finally:
        handle.remove()
    return {"export": str(folder), "samples": samples, "mode": "integer_exact" if exact else "float_simulation",
            "tasks": rows, "overall": _agreement_row(totals, overall)}


def _agreement_row(metrics: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    # Most positions differ by float rounding only; a flipped activation code shows as a position far above it.
    diffs = torch.cat(stats["position_diffs"]) if stats["position_diffs"] else torch.zeros(1)
    return {"positions": stats["positions"], "top1_answer": float(metrics["answer"].compute()),
            "top1_all": float(metrics["all"].compute()), "top1_decided": float(metrics["decided"].compute()),
            "decided_fraction": stats["decided"] / max(1, stats["positions"]),
            "max_abs_diff": stats["max_abs_diff"], "max_rel_diff": stats["max_rel_diff"],
            "median_position_diff": float(diffs.median()),
            "share_positions_above_1e-3": float((diffs > 1e-3).float().mean()),
            "share_positions_identical": stats["identical"] / max(1, stats["positions"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m plugins.quantization.runtime EXPORT [--no-exact]``: fake-quant model (integer-exact mode, or
    the float simulation with ``--no-exact``) vs integer runtime on validation samples."""
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
    parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with the fake-quant model in integer-exact mode (bit-equal logits expected); "
                             "--no-exact compares the float simulation (float matmuls of dequantized values) with "
                             "the integer runtime")
    parser.add_argument("--out", help="also write the result as JSON here")
    opts = parser.parse_args(argv)
    if opts.samples < 1 or opts.batch_size < 1:
        raise SystemExit("--samples / --batch_size: must be >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = check_export(opts.export, opts.tasks, opts.samples, image_size=opts.image_size,
                          max_length=opts.max_length, batch_size=opts.batch_size, seed=opts.seed, exact=opts.exact)
    print(f"fake-quant model ({result['mode'].replace('_', ' ')}) vs integer runtime")
    print(f"{'task':<10} {'positions':>9} {'top1 answer':>11} {'top1 all':>9} {'decided':>8} {'top1 decided':>12} "
          f"{'max |diff|':>10} {'rel':>9} {'median':>9} {'>1e-3':>6} {'identical':>9}")
    for name, row in [*result["tasks"].items(), ("overall", result["overall"])]:
        print(f"{name:<10} {row['positions']:>9} {row['top1_answer']:>11.4f} {row['top1_all']:>9.4f} "
              f"{row['decided_fraction']:>8.3f} {row['top1_decided']:>12.4f} {row['max_abs_diff']:>10.3g} "
              f"{row['max_rel_diff']:>9.2g} {row['median_position_diff']:>9.2g} "
              f"{row['share_positions_above_1e-3']:>6.3f} {row['share_positions_identical']:>9.4f}")
    if opts.out:
        atomic_write_json(opts.out, result)
    return result


if __name__ == "__main__":
    main()
