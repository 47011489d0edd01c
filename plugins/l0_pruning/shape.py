"""Shapes of the text tower: reading them from a model, counting their parameters (exactly for a shape, in
expectation for gate probabilities), turning ``target_fraction`` into a target shape, and checking ``target_shape``.

HF configs give every layer one shape, so a target is a *shape*: ``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, ``hidden_size``; ``head_dim`` never changes. Grouped-query attention
stays valid when ``num_attention_heads`` is a multiple of ``num_key_value_heads`` and no group grows: pruning keeps
``num_key_value_heads`` whole KV groups per layer and the same number of query heads in each of them.
Qwen2-VL's attention derives ``head_dim`` from ``hidden_size / num_attention_heads``, so there the pruned
``hidden_size`` must equal ``num_attention_heads * head_dim``: hidden dims follow the kept heads.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch

from plugins.l0_pruning.gates import KINDS, MaskShape

SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
# Text towers whose attention computes head_dim = hidden_size // num_attention_heads.
HIDDEN_FOLLOWS_HEADS = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class TowerFacts:
    """What the parameter count of a text tower depends on besides its shape."""

    vocab: int
    tied: bool
    q_bias: bool
    kv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_follows_heads: bool


def text_config(config: Any) -> Any:
    """The text part of a VLM config (or the config itself for a text-only model)."""
    return getattr(config, "text_config", None) or config


def read_shape(config: Any) -> MaskShape:
    """The text tower's shape from an HF config."""
    tc = text_config(config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return MaskShape(tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads or tc.num_attention_heads,
                     tc.intermediate_size, tc.hidden_size, head_dim)


def read_facts(model: Any, text_model: Any, layer: Any) -> TowerFacts:
    """Biases, tying and vocabulary of a built model."""
    attn, mlp = layer.self_attn, layer.mlp
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is text_model.embed_tokens.weight
    return TowerFacts(
        vocab=text_model.embed_tokens.num_embeddings, tied=tied or lm_head is None,
        q_bias=attn.q_proj.bias is not None, kv_bias=attn.k_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
        mlp_bias=mlp.down_proj.bias is not None,
        hidden_follows_heads=text_config(model.config).model_type in HIDDEN_FOLLOWS_HEADS,
    )


def count_params(shape: MaskShape, facts: TowerFacts, probs: dict[str, torch.Tensor] | None = None) -> Any:
    """Parameters of the text tower (embeddings, decoder layers, final norm, LM head).

    With ``probs`` (keep probability per unit, shapes as in :mod:`plugins.l0_pruning.gates`) the result is the
    expected count under independent gates, differentiable in ``probs``; with 0/1 masks of a uniform shape it is
    that shape's exact count. Without ``probs`` it is ``shape``'s count (a Python int).
    """
    if probs is None:
        L, D, I, hd = shape.layers, shape.hidden, shape.intermediate, shape.head_dim
        q, kv = shape.heads, shape.kv_heads
        attn = 2 * D * hd * (q + kv) + facts.q_bias * q * hd + facts.kv_bias * 2 * kv * hd + facts.o_bias * D
        mlp = 3 * D * I + facts.mlp_bias * (2 * I + D)
        return int(L * (attn + mlp + 2 * D) + facts.vocab * D * (1 if facts.tied else 2) + D)
    any_prob = next(iter(probs.values()))
    ones = {"heads": (shape.layers, shape.heads), "mlp": (shape.layers, shape.intermediate),
            "hidden": (shape.hidden,), "layers": (shape.layers, 2)}
    p = {k: probs[k] if k in probs else torch.ones(ones[k], device=any_prob.device) for k in KINDS}
    D, hd = p["hidden"].sum(), shape.head_dim
    q = p["heads"].sum(-1)
    groups = p["heads"].view(shape.layers, -1, shape.group)
    # A KV group is kept unless all its query heads are dropped. The product is written out: torch.prod's
    # backward checks its input for zeros, a read-back that would make every training step wait for the GPU.
    kv = (1 - functools.reduce(operator.mul, (1 - groups).unbind(-1))).sum(-1)
    I = p["mlp"].sum(-1)
    a, m = p["layers"][:, 0], p["layers"][:, 1]
    attn = a * (2 * D * hd * (q + kv) + facts.q_bias * q * hd + facts.kv_bias * 2 * kv * hd + facts.o_bias * D)
    mlp = m * (3 * D * I + facts.mlp_bias * (2 * I + D))
    norms = (a + m) * D
    return (attn + mlp + norms).sum() + facts.vocab * D * (1 if facts.tied else 2) + D


def prunable_params(full: MaskShape, facts: TowerFacts, kinds: tuple[str, ...]) -> int:
    """Parameters that depend on at least one enabled unit kind (those a fraction is taken of)."""
    zero = replace(full, layers=0 if "layers" in kinds else full.layers,
                   heads=0 if "heads" in kinds else full.heads, kv_heads=0 if "heads" in kinds else full.kv_heads,
                   intermediate=0 if "mlp" in kinds else full.intermediate, hidden=0 if "hidden" in kinds else full.hidden)
    return count_params(full, facts) - count_params(zero, facts)


def _round_to(value: float, multiple: int, high: int) -> int:
    return int(min(high, max(multiple, multiple * round(value / multiple))))


def shape_for_fraction(full: MaskShape, facts: TowerFacts, kinds: tuple[str, ...], fraction: float,
                       multiple_of: int = 1) -> MaskShape:
    """The target shape for removing ``fraction`` of the prunable parameters.

    Every enabled dimension shrinks by one common factor (layers, KV groups -- or query heads when there is a single
    KV group -- hidden size and MLP width), then the MLP width (the finest unit) is set so the count comes closest to
    the target. ``multiple_of`` rounds hidden and MLP widths (e.g. 8 or 64 for fast kernels).
    """
    target = count_params(full, facts) - fraction * prunable_params(full, facts, kinds)

    def at(s: float) -> MaskShape:
        layers = max(1, round(s * full.layers)) if "layers" in kinds else full.layers
        heads, kv = full.heads, full.kv_heads
        if "heads" in kinds:
            if full.kv_heads > 1:
                kv = max(1, round(s * full.kv_heads))
                heads = kv * full.group
            else:
                heads = max(1, round(s * full.heads))
        # transformers (5.x) refuses a Llama config whose hidden size is not a multiple of its heads, even with
        # head_dim given, so the hidden width rounds to a common multiple of both.
        hidden = (_round_to(s * full.hidden, math.lcm(multiple_of, heads), full.hidden) if "hidden" in kinds
                  else full.hidden)
        if facts.hidden_follows_heads and "hidden" in kinds:
            hidden = heads * full.head_dim
        inter = _round_to(s * full.intermediate, multiple_of, full.intermediate) if "mlp" in kinds else full.intermediate
        return MaskShape(layers, heads, kv, inter, hidden, full.head_dim)

    best = min((at(i / 1000) for i in range(1, 1001)), key=lambda sh: abs(count_params(sh, facts) - target))
    if "mlp" in kinds:
        c0 = count_params(replace(best, intermediate=0), facts)
        slope = count_params(replace(best, intermediate=1), facts) - c0
        inter = _round_to((target - c0) / slope, multiple_of, full.intermediate)
        best = replace(best, intermediate=inter)
    return best


def shape_from_dict(full: MaskShape, facts: TowerFacts, kinds: tuple[str, ...], target: dict[str, int]) -> MaskShape:
    """Check a ``target_shape`` against the model and the enabled unit kinds.

    Raises:
        ValueError: unknown keys, a size larger than the model's or below 1, a dimension whose unit kind is off,
            an invalid grouped-query shape, or (Qwen2-VL) a hidden size that is not heads x head_dim.
    """
    unknown = sorted(set(target) - set(SHAPE_KEYS))
    if unknown:
        raise ValueError(f"L0Pruning.target_shape: unknown keys {unknown}; allowed: {list(SHAPE_KEYS)}")
    have = {"num_hidden_layers": full.layers, "num_attention_heads": full.heads,
            "num_key_value_heads": full.kv_heads, "intermediate_size": full.intermediate, "hidden_size": full.hidden}
    kind_of = {"num_hidden_layers": "layers", "num_attention_heads": "heads", "num_key_value_heads": "heads",
               "intermediate_size": "mlp", "hidden_size": "hidden"}
    want = dict(have)
    for key, value in target.items():
        if not isinstance(value, int) or not 1 <= value <= have[key]:
            raise ValueError(f"L0Pruning.target_shape.{key}: must be an integer in [1, {have[key]}] (the model has "
                             f"{have[key]}), got {value!r}")
        if value != have[key] and kind_of[key] not in kinds:
            raise ValueError(f"L0Pruning.target_shape.{key}: shrinking it needs prune_{kind_of[key]}: true")
        want[key] = value
    heads, kv = want["num_attention_heads"], want["num_key_value_heads"]
    if "num_attention_heads" in target and "num_key_value_heads" not in target and heads % full.kv_heads:
        raise ValueError(f"L0Pruning.target_shape: num_attention_heads={heads} is not a multiple of the model's "
                         f"{full.kv_heads} KV heads; give num_key_value_heads too")
    if heads % kv or heads // kv > full.group:
        raise ValueError(
            f"L0Pruning.target_shape: num_attention_heads={heads}, num_key_value_heads={kv} is not a valid grouped-query "
            f"shape here: heads must be a multiple of KV heads with at most {full.group} query heads per KV group")
    shape = MaskShape(want["num_hidden_layers"], heads, kv, want["intermediate_size"], want["hidden_size"], full.head_dim)
    if shape.hidden % shape.heads:
        raise ValueError(f"L0Pruning.target_shape.hidden_size: must be a multiple of num_attention_heads={shape.heads} "
                         f"(transformers refuses other Llama configs), got {shape.hidden}")
    if facts.hidden_follows_heads and shape.hidden != shape.heads * full.head_dim:
        raise ValueError(
            f"L0Pruning.target_shape.hidden_size: this model's attention takes head_dim = hidden_size / "
            f"num_attention_heads, so hidden_size must be num_attention_heads x {full.head_dim} = "
            f"{shape.heads * full.head_dim}, got {shape.hidden}")
    return shape


def shape_dict(shape: MaskShape) -> dict[str, int]:
    """A shape as HF config keys."""
    return {"num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "intermediate_size": shape.intermediate,
            "hidden_size": shape.hidden, "head_dim": shape.head_dim}
