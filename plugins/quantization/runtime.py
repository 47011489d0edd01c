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
