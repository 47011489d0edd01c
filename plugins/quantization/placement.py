"""Placement: fake quantizers on the modules a :class:`~framework.selection.ModuleSelection` chooses.

Parameter names of the HF model never change. A quantized Linear keeps its ``weight`` and ``bias``; its class
becomes :class:`QuantLinear` (a subclass of ``nn.Linear`` whose forward multiplies by the fake-quantized weight),
so PEFT still recognises and wraps it. A quantized Embedding (token embeddings: at 4 bits the table of a small
model is a tenth of its bits, so a whole-model size goal needs it) becomes :class:`QuantEmbedding` the same way;
its rows are its channels (one scale per token, or per group of a row). A quantized convolution (a vision tower's
patch embedding: 16-bit, it can be a tenth of a 1.8-bit model's bits) becomes :class:`QuantConv2d` /
:class:`QuantConv3d`, one scale per output channel or per tensor. Activation quantizers run in forward
pre-hooks (inputs) and forward hooks (outputs) of the existing modules, which works on any module (the KV
projections, the vision projector). Quantizers are submodules named ``weight_quantizer``, ``input_quantizer`` and
``output_quantizer``, so their scales are checkpointed beside the weights. A quantized tensor is named by its module and point:
``<module>.weight``, ``<module>.input``, ``<module>.output`` (the keys of the encodings file).

:func:`integer_exact_eval` switches quantized Linear layers to integer arithmetic for evaluation (codes times
codes, exact accumulation, then scales), the computation the integer runtime and a device perform.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.selection import ModuleSelection
from plugins.quantization.config import QuantSpec, check_points, check_spec
from plugins.quantization.quantizer import FakeQuantizer, integer_linear

WEIGHT, INPUT, OUTPUT = "weight_quantizer", "input_quantizer", "output_quantizer"
_POINT_ATTR = {"weight": WEIGHT, "input": INPUT, "output": OUTPUT}


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses its ``weight_quantizer``'s fake-quantized weight (names unchanged).

    Attributes:
        integer_exact: in eval mode, when both the weight and the input are quantized, compute the output as a
            device does instead of a float matmul of dequantized values: the input's integer codes times the
            weight's integer codes, accumulated exactly per block, then scaled
            (:func:`~plugins.quantization.quantizer.integer_linear`, shared with
            :class:`~plugins.quantization.runtime.IntegerRuntime`). Same math, different float rounding; off by
            default (training always uses the float path, which has the gradients). See :func:`integer_exact_eval`.
    """

    integer_exact: bool = False

    def integer_path(self) -> bool:
        """Whether this forward takes the integer path (``integer_exact``, eval, weight and input quantizing)."""
        if not self.integer_exact or self.training:
            return False
        quantizers = (self._modules.get(WEIGHT), self._modules.get(INPUT))
        return all(q is not None and q.enabled and not q.observing for q in quantizers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self._modules.get(WEIGHT)
        if self.integer_path():  # the input hook left x unquantized for this
            y = integer_linear(self._modules[INPUT].integer(x), quantizer.integer(self.weight))
            if self.bias is not None:
                y = y + self.bias.float()
            return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        weight = self.weight if quantizer is None else quantizer(self.weight)
        return F.linear(x, weight, self.bias)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookup reads its ``weight_quantizer``'s fake-quantized table (names unchanged).

    A looked-up row is ``(code - zero_point) * scale`` exactly, in float32 before the cast to the table's dtype,
    which is what :class:`~plugins.quantization.runtime.IntegerRuntime` computes from the exported codes.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's argument name)
        quantizer = self._modules.get(WEIGHT)
        weight = self.weight if quantizer is None else quantizer(self.weight)
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class _QuantConv:
    """The forward of a convolution whose ``weight_quantizer`` fake-quantizes its kernel (names unchanged)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (the convolutions' argument name)
        quantizer = self._modules.get(WEIGHT)
        weight = self.weight if quantizer is None else quantizer(self.weight)
        return self._conv_forward(input, weight, self.bias)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses its ``weight_quantizer``'s fake-quantized kernel (a patch embedding)."""


class QuantConv3d(_QuantConv, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses its ``weight_quantizer``'s fake-quantized kernel (Qwen2-VL's patches)."""


_QUANT_CLASS = {nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding, nn.Conv2d: QuantConv2d,
                nn.Conv3d: QuantConv3d}
_FLOAT_CLASS = {quant: float_class for float_class, quant in _QUANT_CLASS.items()}
#: The layers whose weights take a quantizer; a convolution's kernel is quantized per tensor or per output channel.
WEIGHT_LAYERS = tuple(_QUANT_CLASS)
CONVOLUTIONS = (nn.Conv2d, nn.Conv3d)


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """``{module: [other modules holding the same weight tensor]}`` for every weight shared between modules (tied
    input and output embeddings)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append(name)
    return {name: [other for other in names if other != name]
            for names in holders.values() if len(names) > 1 for name in names}


def set_integer_exact(model: nn.Module, enabled: bool) -> int:
    """Set :attr:`QuantLinear.integer_exact` on every quantized Linear of ``model``; returns how many there are."""
    if not isinstance(enabled, bool):
        raise TypeError(f"integer_exact: must be true or false, got {enabled!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.integer_exact = enabled
    return len(layers)


@contextmanager
def attributes_set(objects: Iterable[object], **values: object) -> Iterator[None]:
    """Set ``values`` as attributes of every object inside the block; restore each object's own values after."""
    objects = list(objects)
    saved = [{name: getattr(obj, name) for name in values} for obj in objects]
    for obj in objects:
        for name, value in values.items():
            setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, old in zip(objects, saved):
            for name, value in old.items():
                setattr(obj, name, value)


@contextmanager
def integer_exact_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate quantized Linear layers with integer arithmetic inside the block (see :class:`QuantLinear`).

    Example::

        with torch.no_grad(), integer_exact_eval(model.eval()):
            logits = model(**batch).logits   # what IntegerRuntime computes from the export
    """
    with attributes_set((m for m in model.modules() if isinstance(m, QuantLinear)), integer_exact=True):
        yield model


def _input_hook(module: nn.Module, args: tuple) -> tuple | None:
    quantizer = module._modules.get(INPUT)
    if quantizer is None:
        return None
    if isinstance(module, QuantLinear) and module.integer_path():
        return None  # forward quantizes the input to integer codes itself
    if not args or not torch.is_tensor(args[0]):
        raise TypeError(f"{type(module).__name__}: an input quantizer needs the tensor as first positional argument")
    return (quantizer(args[0]), *args[1:])


def _output_hook(module: nn.Module, args: tuple, output: Any) -> Any:
    quantizer = module._modules.get(OUTPUT)
    if quantizer is None:
        return None
    if not torch.is_tensor(output):
        raise TypeError(f"{type(module).__name__} returns a {type(output).__name__}; output quantizers take a tensor")
    return quantizer(output)


def _attach(module: nn.Module, point: str, spec: QuantSpec, shape: tuple[int, ...] | None, name: str) -> FakeQuantizer:
    attr = _POINT_ATTR[point]
    existing = module._modules.get(attr)
    if existing is not None:
        if existing.spec.to_dict() != spec.to_dict():
            raise ValueError(f"{name}.{point} is already quantized with {existing.spec}; a second plugin or site asks "
                             f"for {spec}; narrow one `targets` so they do not overlap")
        return existing
    quantizer = FakeQuantizer(spec, shape)
    device = next((p.device for p in module.parameters()), None)
    if device is not None:
        quantizer.to(device)
    module.add_module(attr, quantizer)
    if point == "input" and _input_hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_input_hook)
    if point == "output" and _output_hook not in module._forward_hooks.values():
        module.register_forward_hook(_output_hook)
    return quantizer


def attach_quantizers(
    model: nn.Module,
    weights: QuantSpec | None = None,
    activations: QuantSpec | None = None,
    targets: ModuleSelection | None = None,
    activation_points: list[str] | tuple[str, ...] = ("input",),
    *,
    key: str = "quantization",
) -> dict[str, FakeQuantizer]:
    """Put weight quantizers on the chosen Linear, Embedding and convolution layers and activation quantizers at
    ``activation_points`` of every chosen module. Idempotent (a quantizer with the same spec is kept). An
    Embedding's input is token ids, not an activation: it gets no input quantizer (its output can have one).

    Args:
        model: any ``nn.Module`` (an HF VLM, a bare text model).
        weights: spec of the weight quantizers (``None``: weights stay float).
        activations: spec of the activation quantizers (``None``: activations stay float).
        targets: which modules; default every Linear.
        activation_points: ``input`` and/or ``output`` of each chosen module.
        key: YAML key named in errors.

    Returns:
        ``{tensor name: quantizer}`` for this call (``<module>.weight`` / ``.input`` / ``.output``).

    Raises:
        ValueError: nothing matched, weights asked of a module that is not a Linear, Embedding or convolution, a
            group size that does not divide a layer's inputs (an embedding's width), groups asked of a
            convolution, a weight tied to another module's that is not
            selected too (naming both; tied ones share one quantizer), or a point already quantized with another
            spec.

    Example::

        attach_quantizers(model, QuantSpec(bits=4, granularity="group", group_size=32),
                          QuantSpec(bits=8, granularity="tensor", symmetric=False),
                          ModuleSelection(include="language_model", exclude="lm_head"))
    """
    targets = targets or ModuleSelection()
    if weights is not None:
        check_spec(weights, "weights", f"{key}.weights")
    if activations is not None:
        check_spec(activations, "activations", f"{key}.activations")
        activation_points = check_points(list(activation_points), f"{key}.activation_points")
    chosen = targets.select(model, owner=f"{key}.targets")
    if weights is not None:
        tied = tied_weights(model)
        for name, module in chosen.items():
            if not isinstance(module, WEIGHT_LAYERS):
                raise ValueError(f"{key}.targets: {name} is a {type(module).__name__}; weights are quantized on Linear, "
                                 "Embedding, Conv2d and Conv3d layers (use activation_sites for other modules)")
            if isinstance(module, CONVOLUTIONS) and weights.granularity not in ("tensor", "channel"):
                raise ValueError(f"{key}.weights.granularity: {weights.granularity} on {name}, a "
                                 f"{type(module).__name__}; a convolution's kernel is quantized per tensor or per "
                                 "output channel (narrow `targets` to give it its own plugin)")
            width = module.weight.shape[1]
            if weights.granularity == "group" and width % weights.group_size:
                raise ValueError(f"{key}.weights.group_size: {weights.group_size} does not divide the "
                                 f"{width} inputs of {name}; choose a divisor or narrow `targets`")
            if type(module) not in (*_QUANT_CLASS, *_FLOAT_CLASS):
                raise ValueError(f"{key}.targets: {name} is a {type(module).__name__}, a subclass with its own "
                                 "forward; quantize the plain nn.Linear / nn.Embedding / nn.ConvNd before wrapping it")
            for other in tied.get(name, []):
                # One tensor, one quantizer: the modules sharing a weight (tied input and output embeddings) are
                # quantized together, or baking one would change the other's float weight behind its back.
                partner = model.get_submodule(other)._modules.get(WEIGHT)
                if isinstance(partner, FakeQuantizer) and partner.spec.to_dict() != weights.to_dict():
                    raise ValueError(f"{name}.weight is tied to {other}.weight, quantized with {partner.spec}; "
                                     f"{key} asks for {weights}; one tensor takes one spec")
                if other not in chosen and not isinstance(partner, FakeQuantizer):
                    raise ValueError(f"{key}.targets: {name}.weight is the same tensor as {other}.weight (tied "
                                     f"embeddings); select both (e.g. types [Linear, Embedding]) to quantize the "
                                     f"shared table once, or neither")
    result: dict[str, FakeQuantizer] = {}
    for name, module in chosen.items():
        if weights is not None:
            shared = next((q for other in tied.get(name, []) if isinstance(
                q := model.get_submodule(other)._modules.get(WEIGHT), FakeQuantizer)), None)
            if shared is not None and module._modules.get(WEIGHT) is None:  # its spec was checked above
                module.add_module(WEIGHT, shared)
            result[f"{name}.weight"] = _attach(module, "weight", weights, tuple(module.weight.shape), name)
            module.__class__ = _QUANT_CLASS.get(type(module), type(module))
        if activations is not None:
            for point in activation_points:
                if point == "input" and isinstance(module, nn.Embedding):
                    continue  # token ids
                result[f"{name}.{point}"] = _attach(module, point, activations, None, name)
    return result


def check_sibling_groups(groups: Any, key: str) -> list[list[str]]:
    """``groups`` as a list of sibling-name groups (e.g. ``[[q_proj, k_proj, v_proj]]``).

    Raises:
        ValueError: naming ``key``: not a list, or a group that is not two or more non-empty names.
    """
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"{key}: a list of sibling-name groups or null, got {groups!r}")
    for index, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or len(group) < 2 or not all(isinstance(n, str) and n for n in group):
            raise ValueError(f"{key}[{index}]: a group is a list of two or more sibling module names "
                             f"(e.g. [q_proj, k_proj, v_proj]), got {group!r}")
    return [list(group) for group in groups]


def shared_input_map(model: nn.Module, groups: list[list[str]], quantizers: dict[str, FakeQuantizer],
                     key: str = "quantization.shared_inputs") -> dict[str, str]:
    """Resolve sibling groups (e.g. ``[q_proj, k_proj, v_proj]``) to ``{tensor: tensor whose quantizer it shares}``.

    Siblings of one parent that read the same tensor (a decoder layer's q/k/v projections read the normed hidden
    state, its gate/up projections the next one) are one activation on a device, quantized once with one encoding.
    Here the first sibling's input quantizer becomes the group's; the others' inputs point at it.

    Raises:
        ValueError: naming ``key[index]``: a group with fewer than two names, an input quantized on some siblings of
            a parent but not on others, siblings with different specs, or a group no parent has quantized.
    """
    shared: dict[str, str] = {}
    for index, group in enumerate(check_sibling_groups(groups, key)):
        matched = 0
        for parent_name, parent in model.named_modules():
            present = [name for name in group if isinstance(parent._modules.get(name), nn.Module)]
            if len(present) < 2:
                continue
            tensors = [f"{parent_name}.{name}.input" if parent_name else f"{name}.input" for name in present]
            quantized = [t for t in tensors if t in quantizers]
            if not quantized:
                continue
            if len(quantized) != len(tensors):
                missing = ", ".join(t for t in tensors if t not in quantized)
                raise ValueError(f"{key}[{index}]: {missing} not quantized while {quantized[0]} is; siblings that read "
                                 "one tensor share its quantizer, so select all of them or none")
            first = quantizers[tensors[0]]
            for tensor in tensors[1:]:
                if quantizers[tensor].spec.to_dict() != first.spec.to_dict():
                    raise ValueError(f"{key}[{index}]: {tensor} is quantized with {quantizers[tensor].spec} but "
                                     f"{tensors[0]} with {first.spec}; one shared quantizer needs one spec")
                shared[tensor] = tensors[0]
            matched += 1
        if not matched:
            raise ValueError(f"{key}[{index}]: no module has the siblings {list(group)} with quantized inputs")
    return shared


def share_quantizers(model: nn.Module, shared: dict[str, str]) -> None:
    """Point each tensor's quantizer at the one of the tensor it shares (``{tensor: canonical tensor}``, as from
    :func:`shared_input_map` or an export's ``vlmc.shared_activations``). Idempotent.

    Raises:
        ValueError: a tensor or canonical tensor without a quantizer, or specs that differ (naming both).
    """
    quantizers = quantizers_of(model)
    for tensor, canonical in shared.items():
        for name in (tensor, canonical):
            if name not in quantizers:
                raise ValueError(f"shared quantizers: {name} has no quantizer in the model")
        target = quantizers[canonical]
        if quantizers[tensor].spec.to_dict() != target.spec.to_dict():
            raise ValueError(f"shared quantizers: {tensor} ({quantizers[tensor].spec}) and {canonical} "
                             f"({target.spec}) differ; one shared quantizer needs one spec")
        module, point = quantized_module(model, tensor)
        module._modules[_POINT_ATTR[point]] = target


def sharing_of(quantizers: dict[str, FakeQuantizer]) -> dict[str, str]:
    """``{tensor: first tensor with the same quantizer object}`` for every tensor whose quantizer is shared."""
    first: dict[int, str] = {}
    shared = {}
    for name, quantizer in quantizers.items():
        if id(quantizer) in first:
            shared[name] = first[id(quantizer)]
        else:
            first[id(quantizer)] = name
    return shared


def distinct(quantizers: Iterable[FakeQuantizer]) -> list[FakeQuantizer]:
    """Each quantizer once (shared ones appear under several tensor names)."""
    seen: dict[int, FakeQuantizer] = {}
    for quantizer in quantizers:
        seen.setdefault(id(quantizer), quantizer)
    return list(seen.values())


def quantizers_of(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every quantizer of ``model`` by tensor name (``<module>.weight`` / ``.input`` / ``.output``), in module order."""
    found: dict[str, FakeQuantizer] = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            continue
        for point, attr in _POINT_ATTR.items():
            quantizer = module._modules.get(attr)
            if isinstance(quantizer, FakeQuantizer):
                found[f"{name}.{point}" if name else point] = quantizer
    return found


def quantized_module(model: nn.Module, tensor: str) -> tuple[nn.Module, str]:
    """The module and point (``weight`` / ``input`` / ``output``) of a tensor name from :func:`quantizers_of`."""
    module_name, _, point = tensor.rpartition(".")
    return model.get_submodule(module_name), point


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the same model in float: every quantizer passes its input through inside the block.

    Example::

        with quantization_disabled(model):
            teacher_logits = model(**batch).logits
    """
    with attributes_set(quantizers_of(model).values(), enabled=False, observing=False):
        yield model


def set_quantizers(model: nn.Module, *, enabled: bool | None = None, observing: bool | None = None) -> None:
    """Switch every quantizer of ``model`` on / off, or into / out of observation."""
    for quantizer in quantizers_of(model).values():
        if enabled is not None:
            quantizer.enabled = enabled
        if observing is not None:
            quantizer.observing = observing


@torch.no_grad()
def remove_quantizers(model: nn.Module, *, bake_weights: bool = True, names: set[str] | None = None) -> None:
    """Remove every quantizer and hook (or those of the tensors in ``names``); with ``bake_weights`` write the
    fake-quantized weights into the layers first (what HF ``from_pretrained`` then loads). Linear, Embedding and
    convolution layers without quantizers left become plain ``nn.Linear`` / ``nn.Embedding`` / ``nn.ConvNd`` again."""
    modules = None if names is None else {n.rpartition(".")[0] for n in names}
    baked: set[int] = set()  # a tied weight is baked once
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizer) or (modules is not None and name not in modules):
            continue
        weight_q = module._modules.get(WEIGHT)
        if isinstance(weight_q, FakeQuantizer) and bake_weights and id(module.weight) not in baked:
            module.weight.copy_(weight_q.fake_quant(module.weight.detach()))
            baked.add(id(module.weight))
        for attr in (WEIGHT, INPUT, OUTPUT):
            if attr in module._modules:
                del module._modules[attr]
        for hooks, fn in ((module._forward_pre_hooks, _input_hook), (module._forward_hooks, _output_hook)):
            for hook_id in [k for k, v in hooks.items() if v is fn]:
                del hooks[hook_id]
        if type(module) in _FLOAT_CLASS:
            module.__class__ = _FLOAT_CLASS[type(module)]
