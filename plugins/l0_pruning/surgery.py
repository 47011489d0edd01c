"""Model surgery: finding the text tower, applying masks with forward hooks, and removing pruned units for real.

Masks enter the model as multiplicative factors on unit outputs (the "pseudo-input" of the method), through
forward hooks that leave every HF parameter name unchanged:

* heads: the input of ``o_proj``, viewed as ``[..., H, head_dim]``, times the head mask of the layer;
* MLP channels: the input of ``down_proj`` times the channel mask;
* hidden dims: ``inputs_embeds`` of the text model and the outputs of ``o_proj`` and ``down_proj`` times the hidden
  mask, so masked dims of the residual stream are exactly zero; every RMSNorm of the text tower then takes its mean
  of squares over the kept dims only (sum of squares / sum of the mask), which is what the smaller model computes.
  HF's LLaVA config ties the projector's inner width to the text hidden size, so the hidden mask also masks the
  output of ``multi_modal_projector.linear_1`` (those projector units are removed with the hidden dims);
* layers: the outputs of ``self_attn`` and ``mlp`` times the layer's block gates.

:func:`prune_model` then slices the weights and edits the config, so the result is a standard, smaller HF model
whose outputs equal the masked model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from plugins.l0_pruning.gates import L0Masks, MaskShape
from plugins.l0_pruning.shape import read_shape, text_config

MASKS_ATTR = "l0_masks"


# ----------------------------------------------------------------------------------------------- finding the tower
def find_text_tower(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[nn.Module, nn.ModuleList]:
    """The text model owning the selected decoder layers, and its layer list.

    Raises:
        ValueError: the selection is not exactly the decoder layers of one Llama/Qwen-style text model.
    """
    owners = {}
    for name, module in model.named_modules():
        stack = getattr(module, "layers", None)
        if isinstance(stack, nn.ModuleList) and hasattr(module, "embed_tokens") and hasattr(module, "norm"):
            owners[name] = module
    for name, text in owners.items():
        names = {f"{name}.layers.{i}" if name else f"layers.{i}" for i in range(len(text.layers))}
        if set(layers) == names:
            for layer in text.layers:
                attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
                if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
                        hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
                    raise ValueError(f"L0Pruning.targets: {type(layer).__name__} is not a Llama/Qwen-style decoder "
                                     "layer (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)")
            return text, text.layers
    found = ", ".join(sorted(layers)[:4])
    raise ValueError(
        "L0Pruning.targets: must select every decoder layer of one text model (HF configs give all layers one "
        f"shape), e.g. include: language_model, types: [GradientCheckpointingLayer]; selected: {found}"
        + (" ..." if len(layers) > 4 else ""))


def projector_inner(model: nn.Module) -> nn.Linear | None:
    """LLaVA's first projector layer, whose output width HF ties to the text hidden size (None elsewhere)."""
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    linear = getattr(projector, "linear_1", None)
    return linear if isinstance(linear, nn.Linear) and isinstance(getattr(projector, "linear_2", None), nn.Linear) else None


def projector_removed(model: nn.Module, hidden: int, kept: int) -> int:
    """Projector parameters that go when the text hidden size shrinks from ``hidden`` to ``kept``."""
    removed = 0
    inner, out = projector_inner(model), projector_output(model)
    if inner is not None:
        removed += (hidden - kept) * (inner.in_features + (inner.bias is not None))
        removed += hidden * hidden - kept * kept
    elif out is not None:
        removed += (hidden - kept) * out.in_features
    if out is not None and out.bias is not None:
        removed += hidden - kept
    return removed


def projector_output(model: nn.Module) -> nn.Linear | None:
    """The last linear layer feeding image features into the text tower's hidden size."""
    inner = getattr(model, "model", model)
    projector = getattr(inner, "multi_modal_projector", None)
    if projector is not None and isinstance(getattr(projector, "linear_2", None), nn.Linear):
        return projector.linear_2
    merger = getattr(getattr(inner, "visual", None), "merger", None)
    if merger is not None:
        linears = [m for m in merger.modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None
    return None


# ----------------------------------------------------------------------------------------------- hooks
class _Hook:
    """Base of the mask hooks: a callable object (so a deep copy of the model points at the copy's masks)."""

    def __init__(self, masks: L0Masks, kind: str, index: int | None = None) -> None:
        self.masks, self.kind, self.index = masks, kind, index
        # The layer's row of a stacked mask is picked with a tensor index: a Python int would be a constant of a
        # compiled block's graph, so each layer would compile its own (and past eight, run eagerly).
        self._index = None if index is None else torch.tensor(index)

    def place(self, device: torch.device) -> None:
        """Keep the layer index on the masks' device (done eagerly by the model's pre-hook, so a compiled block
        never creates it: a tensor made inside a CUDA graph and kept would live in the graph's memory pool)."""
        if self._index is not None and self._index.device != device:
            self._index = self._index.to(device)

    def row(self, mask: torch.Tensor) -> torch.Tensor:
        """This hook's layer's row of a stacked ``[layers, ...]`` mask."""
        self.place(mask.device)  # a no-op once the model's pre-hook has placed it
        return mask.index_select(0, self._index.reshape(1)).squeeze(0)

    def current(self, kind: str) -> torch.Tensor:
        # A submodule can run before the model's own pre-hook (e.g. generate embedding the prompt itself, or a
        # fresh copy of the model): compute the masks then.
        if kind not in self.masks.current:
            self.masks.refresh()
        return self.masks.current[kind]

    def mask(self) -> torch.Tensor | None:
        mask = self.current(self.kind) if self.kind in self.masks.config.kinds else None
        return None if mask is None or self._index is None else self.row(mask)


class _Refresh(_Hook):
    """The model's pre-hook: computes this forward's masks and places the layer hooks' indices beside them."""

    def __init__(self, masks: L0Masks, kind: str) -> None:
        super().__init__(masks, kind)
        self.layer_hooks: list[_Hook] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        current = self.masks.refresh()
        if current:
            device = next(iter(current.values())).device
            for hook in self.layer_hooks:
                hook.place(device)


class _HeadInput(_Hook):
    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, mask = args[0], self.mask()
        shape = x.shape
        x = (x.view(*shape[:-1], mask.numel(), -1) * mask.to(x.dtype)[:, None]).view(shape)
        return (x, *args[1:])


class _ChannelInput(_Hook):
    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.mask().to(args[0].dtype), *args[1:])


class _HiddenOutput(_Hook):
    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * self.current("hidden").to(output.dtype)


class _BlockGate(_Hook):
    def __init__(self, masks: L0Masks, index: int, block: int) -> None:
        super().__init__(masks, "layers", index)
        self.block = block

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        gate = self.mask()[self.block]
        if isinstance(output, tuple):
            return (output[0] * gate.to(output[0].dtype), *output[1:])
        return output * gate.to(output.dtype)


class _MaskedRMSNorm(_Hook):
    """RMSNorm whose mean of squares runs over the kept hidden dims only (sum of squares / sum of the mask)."""

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        kept = self.current("hidden").sum().clamp_min(1.0)
        xf = x.to(torch.float32)
        variance = xf.pow(2).sum(-1, keepdim=True) / kept
        return module.weight * (xf * torch.rsqrt(variance + module.variance_epsilon)).to(x.dtype)


class _EmbedMask(_Hook):
    """Masks ``inputs_embeds`` (text and image tokens alike) where the text model receives them."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = module.embed_tokens(input_ids)
            kwargs = {**kwargs, "input_ids": None}
            args = args[1:]
        mask = self.current("hidden")
        return args, {**kwargs, "inputs_embeds": embeds * mask.to(embeds.dtype)}


_HOOK_TYPES = (_Refresh, _HeadInput, _ChannelInput, _HiddenOutput, _BlockGate, _MaskedRMSNorm, _EmbedMask)


def has_mask_hooks(module: nn.Module) -> bool:
    return any(isinstance(h, _HOOK_TYPES) for h in (*module._forward_hooks.values(),
                                                     *module._forward_pre_hooks.values()))


def install_mask_hooks(model: nn.Module, masks: L0Masks, text: nn.Module, layers: nn.ModuleList) -> None:
    """Register the forward hooks that apply ``masks`` (idempotent: a model that has them is left alone)."""
    if has_mask_hooks(model):
        return
    kinds = masks.config.kinds
    refresh = _Refresh(masks, "all")
    model.register_forward_pre_hook(refresh)
    if "hidden" in kinds:
        text.register_forward_pre_hook(_EmbedMask(masks, "hidden"), with_kwargs=True)
        text.norm.register_forward_hook(_MaskedRMSNorm(masks, "hidden"))
        inner = projector_inner(model)
        if inner is not None:  # LLaVA's projector width is the text hidden size in HF's config: masked alike
            inner.register_forward_hook(_HiddenOutput(masks, "hidden"))
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if "heads" in kinds:
            refresh.layer_hooks.append(_HeadInput(masks, "heads", i))
            attn.o_proj.register_forward_pre_hook(refresh.layer_hooks[-1])
        if "mlp" in kinds:
            refresh.layer_hooks.append(_ChannelInput(masks, "mlp", i))
            mlp.down_proj.register_forward_pre_hook(refresh.layer_hooks[-1])
        if "hidden" in kinds:
            attn.o_proj.register_forward_hook(_HiddenOutput(masks, "hidden"))
            mlp.down_proj.register_forward_hook(_HiddenOutput(masks, "hidden"))
            layer.input_layernorm.register_forward_hook(_MaskedRMSNorm(masks, "hidden"))
            layer.post_attention_layernorm.register_forward_hook(_MaskedRMSNorm(masks, "hidden"))
        if "layers" in kinds:
            refresh.layer_hooks += [_BlockGate(masks, i, 0), _BlockGate(masks, i, 1)]
            attn.register_forward_hook(refresh.layer_hooks[-2])
            mlp.register_forward_hook(refresh.layer_hooks[-1])


def remove_mask_hooks(model: nn.Module) -> None:
    """Remove every mask hook (found by type, so this works on a deep copy of the model too)."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _HOOK_TYPES)]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)


# ----------------------------------------------------------------------------------------------- keep sets
def keep_from_masks(masks: dict[str, torch.Tensor], full: MaskShape) -> dict[str, Any]:
    """Index lists of the kept units from 0/1 masks (see :func:`prune_model` for the format)."""
    keep: dict[str, Any] = {}
    if "layers" in masks:
        keep["layers"] = [i for i in range(full.layers) if masks["layers"][i].max() > 0]
    if "heads" in masks:
        keep["heads"] = [torch.nonzero(row > 0).flatten().tolist() for row in masks["heads"]]
    if "mlp" in masks:
        keep["mlp"] = [torch.nonzero(row > 0).flatten().tolist() for row in masks["mlp"]]
    if "hidden" in masks:
        keep["hidden"] = torch.nonzero(masks["hidden"] > 0).flatten().tolist()
    return keep


# ----------------------------------------------------------------------------------------------- physical removal
def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        weight = linear.weight
        if rows is not None:
            weight = weight.index_select(0, rows.to(weight.device))
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.index_select(0, rows.to(weight.device)),
                                           requires_grad=linear.bias.requires_grad)
        if cols is not None:
            weight = weight.index_select(1, cols.to(weight.device))
        linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _rows_of(units: list[int], width: int) -> torch.Tensor:
    return torch.tensor([u * width + j for u in units for j in range(width)], dtype=torch.long)


def _check_uniform(kind: str, lists: list[list[int]]) -> int:
    sizes = {len(x) for x in lists}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"prune_model: keep['{kind}'] must keep the same number (>= 1) in every kept layer, got "
                         f"{sorted(sizes)}")
    return sizes.pop()


def prune_model(model: nn.Module, keep: dict[str, Any]) -> nn.Module:
    """Physically remove pruned units from a Llama/Qwen-style VLM (or text model), in place, and return it.

    Args:
        model: an HF ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or causal LM.
        keep: kept units, each key optional (absent: keep all):
            ``layers``: kept decoder layer indices; ``heads``: per original layer, the kept query-head indices
            (a KV group is kept when any of its query heads is; every kept group must keep the same number);
            ``mlp``: per original layer, kept intermediate channels; ``hidden``: kept hidden dims.

    Raises:
        ValueError: per-layer counts that differ between kept layers, or an invalid grouped-query selection.
    """
    text = next(m for m in model.modules()
                if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens"))
    tc = text_config(model.config)
    full = read_shape(model.config)
    kept_layers = list(keep.get("layers", range(full.layers)))
    if not kept_layers:
        raise ValueError("prune_model: keep['layers'] must keep at least one layer")
    hidden = torch.tensor(keep["hidden"], dtype=torch.long) if "hidden" in keep else None
    heads = [keep["heads"][i] if "heads" in keep else list(range(full.heads)) for i in kept_layers]
    mlp = [keep["mlp"][i] if "mlp" in keep else list(range(full.intermediate)) for i in kept_layers]
    n_heads = _check_uniform("heads", heads)
    _check_uniform("mlp", mlp)
    hd, group = full.head_dim, full.group
    kv_lists = [sorted({h // group for h in hs}) for hs in heads]
    n_kv = _check_uniform("heads (KV groups)", kv_lists)
    if n_heads % n_kv or any(sum(h // group == g for h in hs) != n_heads // n_kv for hs, gs in zip(heads, kv_lists)
                             for g in gs):
        raise ValueError("prune_model: keep['heads'] must keep the same number of query heads in every kept KV group")

    new_layers = nn.ModuleList()
    for new_idx, (old_idx, hs, kvs, ch) in enumerate(zip(kept_layers, heads, kv_lists, mlp)):
        layer = text.layers[old_idx]
        attn, ffn = layer.self_attn, layer.mlp
        q_rows, kv_rows = _rows_of(sorted(hs), hd), _rows_of(kvs, hd)
        _slice_linear(attn.q_proj, q_rows, hidden)
        _slice_linear(attn.k_proj, kv_rows, hidden)
        _slice_linear(attn.v_proj, kv_rows, hidden)
        _slice_linear(attn.o_proj, hidden, q_rows)
        channels = torch.tensor(sorted(ch), dtype=torch.long)
        _slice_linear(ffn.gate_proj, channels, hidden)
        _slice_linear(ffn.up_proj, channels, hidden)
        _slice_linear(ffn.down_proj, hidden, channels)
        if hidden is not None:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                _slice_norm(norm, hidden)
        for attr, value in (("layer_idx", new_idx), ("num_heads", n_heads), ("num_key_value_heads", n_kv),
                            ("num_key_value_groups", n_heads // n_kv), ("head_dim", hd)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(attn, "hidden_size"):
            attn.hidden_size = attn.o_proj.out_features
        for module, attr, value in ((ffn, "intermediate_size", len(ch)), (ffn, "hidden_size", ffn.down_proj.out_features),
                                    (layer, "hidden_size", ffn.down_proj.out_features)):
            if hasattr(module, attr):
                setattr(module, attr, value)
        new_layers.append(layer)
    text.layers = new_layers

    new_hidden = full.hidden
    if hidden is not None:
        new_hidden = len(hidden)
        embed = text.embed_tokens
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = lm_head is not None and lm_head.weight is embed.weight
        with torch.no_grad():
            embed.weight = nn.Parameter(embed.weight.index_select(1, hidden.to(embed.weight.device)).contiguous(),
                                        requires_grad=embed.weight.requires_grad)
        embed.embedding_dim = new_hidden
        if tied:
            lm_head.weight = embed.weight
            lm_head.in_features = new_hidden
        elif lm_head is not None:
            _slice_linear(lm_head, None, hidden)
        _slice_norm(text.norm, hidden)
        projector, inner = projector_output(model), projector_inner(model)
        if inner is not None:
            _slice_linear(inner, hidden, None)
        if projector is not None:
            _slice_linear(projector, hidden, hidden if inner is not None else None)
            vision = getattr(model.config, "vision_config", None)
            if vision is not None and text_config(model.config).model_type.startswith("qwen2"):
                vision.hidden_size = new_hidden  # Qwen2-VL's merger output width

    tc.num_hidden_layers = len(kept_layers)
    tc.num_attention_heads, tc.num_key_value_heads = n_heads, n_kv
    tc.head_dim = hd
    tc.intermediate_size = len(mlp[0])
    tc.hidden_size = new_hidden
    if getattr(tc, "layer_types", None) is not None:
        tc.layer_types = [tc.layer_types[i] for i in kept_layers]
    return model


def _slice_norm(norm: nn.Module, hidden: torch.Tensor) -> None:
    with torch.no_grad():
        norm.weight = nn.Parameter(norm.weight.index_select(0, hidden.to(norm.weight.device)).contiguous(),
                                   requires_grad=norm.weight.requires_grad)
