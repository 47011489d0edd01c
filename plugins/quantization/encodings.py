"""Export and import of static encodings in Qualcomm AIMET's published ``.encodings`` JSON format.

Layout (AIMET 1.x, ``"version": "0.6.1"``)::

    {"version": "0.6.1",
     "activation_encodings": {"<module>.input": [ENC], "<module>.output": [ENC], ...},
     "param_encodings":      {"<module>.weight": [ENC, ENC, ...], ...},
     "excluded_layers": [],
     "quantizer_args": {...},
     "vlmc": {"layouts": {...}, "dynamic_activations": {...}, "shared_activations": {...}}}

    ENC = {"bitwidth": 4, "dtype": "int", "is_symmetric": "True", "scale": s, "offset": o, "min": m, "max": M}

AIMET's convention is ``real = scale * (q + offset)`` with unsigned ``q`` in ``[0, 2^b - 1]``; so ``offset =
-zero_point`` for an asymmetric grid and ``offset = -2^(b-1)`` for a symmetric one, ``min = scale * offset``,
``max = scale * (2^b - 1 + offset)``. A per-tensor entry is a list of one ENC; a per-channel weight has one
ENC per output channel; a per-group (block) weight of shape ``[out, in]`` with ``group_size`` g has
``out * in / g`` ENCs in row-major order (output channel major, then block along the input dimension), and
``vlmc.layouts[name]`` records ``{"granularity", "group_size", "shape"}`` so the blocks can be placed. Dynamic
activation quantizers have no fixed encoding; they are listed in ``vlmc.dynamic_activations`` (bits, symmetry,
granularity) so the runtime computes them per token or group as training did. ``vlmc.shared_activations`` maps a
tensor to the one whose quantizer it shares (``shared_inputs``: one activation read by several siblings, such as
q/k/v; also a weight tied to another, such as an LM head tied to the token table); their entries are identical, a
device quantizes the tensor once, and a tied weight's codes are stored once. Weight quantizers that were
dynamic during training are exported as fixed encodings computed from the final weights.

The integer weight codes go to ``<name>_int_weights.safetensors`` (:func:`framework.storage.save_packed`,
bit-packed at the encoding's bitwidth): symmetric codes are signed (``int8``, ``real = scale * q``), asymmetric
codes unsigned (``uint8``, ``real = scale * (q + offset)``); exact zeros stay zero codes under a symmetric grid,
so sparse weights pack with a bitmask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from framework.io import atomic_write_json
from framework.storage import bpv_report, bpv_row, pack, save_packed
from plugins.quantization.placement import quantized_module, quantizers_of, sharing_of
from plugins.quantization.quantizer import FakeQuantizer

VERSION = "0.6.1"


def _entries(quantizer: FakeQuantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> list[dict[str, Any]]:
    bits, symmetric = quantizer.spec.bits, quantizer.spec.symmetric
    items = []
    for s, z in zip(scale.reshape(-1).tolist(), zero_point.reshape(-1).tolist()):
        offset = -(1 << (bits - 1)) if symmetric else -int(round(z))
        items.append({"bitwidth": bits, "dtype": "int", "is_symmetric": str(bool(symmetric)), "scale": s,
                      "offset": offset, "min": s * offset, "max": s * ((1 << bits) - 1 + offset)})
    return items


def _layout(quantizer: FakeQuantizer, shape: tuple[int, ...] | None) -> dict[str, Any]:
    spec = quantizer.spec
    return {"granularity": spec.granularity, "group_size": spec.group_size, "shape": list(shape) if shape else None}


@torch.no_grad()
def export_encodings(model: nn.Module, names: set[str] | None = None) -> dict[str, Any]:
    """The encodings of every quantizer of ``model`` (or of those in ``names``; see the module docstring).

    Raises:
        ValueError: a static activation quantizer that was never calibrated (naming it).
    """
    params, activations, layouts, dynamic = {}, {}, {}, {}
    quantizers = {n: q for n, q in quantizers_of(model).items() if names is None or n in names}
    for name, quantizer in quantizers.items():
        module, point = quantized_module(model, name)
        if point == "weight":
            weight = module.weight.detach()
            if quantizer.static and not quantizer.is_initialized:
                raise ValueError(f"{name}: the weight quantizer was never calibrated; quantization had not started")
            scale, zero_point = quantizer.qparams(weight)
            params[name] = _entries(quantizer, scale, zero_point)
            layouts[name] = _layout(quantizer, tuple(weight.shape))
        elif quantizer.static:
            if not quantizer.is_initialized:
                raise ValueError(f"{name}: the activation quantizer was never calibrated (no calibration batch ran "
                                 "with quantization on); there is no encoding to export")
            scale, zero_point = quantizer.qparams()
            activations[name] = _entries(quantizer, scale, zero_point)
            layouts[name] = _layout(quantizer, None)
        else:
            dynamic[name] = {"bitwidth": quantizer.spec.bits, "is_symmetric": str(quantizer.spec.symmetric),
                             "granularity": quantizer.spec.granularity, "group_size": quantizer.spec.group_size}
    return {
        "version": VERSION,
        "activation_encodings": activations,
        "param_encodings": params,
        "excluded_layers": [],
        "quantizer_args": {"dtype": "int", "per_channel_quantization": any(
            v["granularity"] != "tensor" for k, v in layouts.items() if k in params)},
        "vlmc": {"layouts": layouts, "dynamic_activations": dynamic, "shared_activations": sharing_of(quantizers)},
    }


@torch.no_grad()
def weight_codes(model: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Integer codes of every quantized weight (or those in ``names``): ``int8`` (symmetric, zero point 0) or
    ``uint8`` (asymmetric). A weight tied to another (``vlmc.shared_activations`` names it) is stored once, under the
    first name."""
    codes = {}
    seen: set[int] = set()  # a tied weight (one quantizer on several modules) is stored once
    for name, quantizer in quantizers_of(model).items():
        if names is not None and name not in names:
            continue
        module, point = quantized_module(model, name)
        if point != "weight" or id(quantizer) in seen:
            continue
        seen.add(id(quantizer))
        q = quantizer.codes(module.weight.detach())
        codes[name] = q.to(torch.int8 if quantizer.spec.symmetric else torch.uint8)
    return codes


def write_quantized_export(encodings: dict[str, Any], codes: dict[str, torch.Tensor], bits: dict[str, int],
                           directory: Path, name: str, extra: dict | None = None,
                           parameters: int | None = None) -> list[str]:
    """Write ``<name>.encodings``, ``<name>_int_weights.safetensors`` (bit-packed codes, dense or bitmask,
    whichever is smaller, values Huffman-coded where that saves at least 1%) and ``<name>_bpv.json`` (one
    :func:`~framework.storage.bpv_row` per weight, their summary and, given the model's ``parameters``, its
    whole-model figure: :func:`~framework.storage.bpv_report`); return the three file names."""
    atomic_write_json(directory / f"{name}.encodings", encodings)
    # Sparse or skewed codes (e.g. the kept weights of a pruned layer) take Huffman-coded values where that pays.
    packed = {key: pack(value, "auto", value_bits=bits[key], value_coding="auto") for key, value in codes.items()}
    save_packed(packed, directory / f"{name}_int_weights.safetensors")
    rows = [bpv_row(key, value) for key, value in packed.items()]
    atomic_write_json(directory / f"{name}_bpv.json", bpv_report(rows, parameters, **(extra or {})))
    return [f"{name}.encodings", f"{name}_int_weights.safetensors", f"{name}_bpv.json"]


def decode_entries(name: str, items: list[dict[str, Any]], bits: int | None = None,
                   symmetric: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """``(scale, zero_point, bits, symmetric)`` of one tensor's ENC list (flat float32 tensors).

    Raises:
        ValueError: naming ``name``: an empty list, mixed or unexpected bitwidth / symmetry, a non-integer dtype
            or an offset that is not on the grid.
    """
    if not isinstance(items, list) or not items:
        raise ValueError(f"encodings: {name} has no encoding entries")
    try:
        widths = {int(e["bitwidth"]) for e in items}
        syms = {str(e["is_symmetric"]) for e in items}
        dtypes = {str(e.get("dtype", "int")) for e in items}
        scales = [float(e["scale"]) for e in items]
        offsets = [int(e["offset"]) for e in items]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"encodings: {name} has a malformed entry ({err!r})") from err
    if len(widths) != 1 or len(syms) != 1 or dtypes != {"int"}:
        raise ValueError(f"encodings: {name} mixes bitwidths {sorted(widths)} / symmetry {sorted(syms)} / dtypes "
                         f"{sorted(dtypes)}; one integer encoding per tensor is supported")
    width, sym = widths.pop(), syms.pop() == "True"
    if bits is not None and width != bits:
        raise ValueError(f"encodings: {name} has bitwidth {width} but its quantizer has {bits} bits")
    if symmetric is not None and sym != symmetric:
        raise ValueError(f"encodings: {name} is_symmetric={sym} but its quantizer is "
                         f"{'symmetric' if symmetric else 'asymmetric'}")
    if not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"encodings: {name} has a scale that is not a positive number")
    if sym:
        if any(o != -(1 << (width - 1)) for o in offsets):
            raise ValueError(f"encodings: {name} is symmetric but an offset is not {-(1 << (width - 1))}")
        zero_point = [0.0] * len(offsets)
    else:
        if any(not -((1 << width) - 1) <= o <= 0 for o in offsets):
            raise ValueError(f"encodings: {name} has an offset outside [{-((1 << width) - 1)}, 0]")
        zero_point = [float(-o) for o in offsets]
    return torch.tensor(scales, dtype=torch.float32), torch.tensor(zero_point), width, sym


def load_encodings(model: nn.Module, encodings: dict[str, Any] | str | Path, *, freeze: bool = True) -> None:
    """Fix every quantizer of ``model`` to the encodings (strict: never falls back to float) and switch all on.

    Args:
        model: a model with quantizers attached the way the encodings were made.
        encodings: the dict of :func:`export_encodings` or a path to a ``.encodings`` file.
        freeze: make the scales non-trainable (``False``: keep learning them from these values).

    Raises:
        ValueError: naming the tensor: a quantizer without an encoding, an encoding without a quantizer, a
            number of entries or a layout shape that does not match, another bitwidth or symmetry, a static
            encoding for a dynamic activation quantizer or the reverse, a tensor shared in the encodings
            (``vlmc.shared_activations``) but not in the model or the reverse, different encodings for one
            shared quantizer.
    """
    if not isinstance(encodings, dict):
        import json

        encodings = json.loads(Path(encodings).read_text())
    for section in ("param_encodings", "activation_encodings"):
        if not isinstance(encodings.get(section), dict):
            raise ValueError(f"encodings: no {section!r} section; not an AIMET encodings file")
    params, acts = encodings["param_encodings"], encodings["activation_encodings"]
    vlmc = encodings.get("vlmc", {})
    layouts, dynamic = vlmc.get("layouts", {}), vlmc.get("dynamic_activations", {})
    quantizers = quantizers_of(model)
    for name in sorted(set(params) - set(quantizers)):
        raise ValueError(f"encodings: {name} has a param encoding but the model has no quantizer for it")
    for name in sorted((set(acts) | set(dynamic)) - set(quantizers)):
        raise ValueError(f"encodings: {name} has an activation encoding but the model has no quantizer for it")
    plan, dynamic_quantizers = [], []
    for name, quantizer in quantizers.items():
        module, point = quantized_module(model, name)
        section = params if point == "weight" else acts
        if point != "weight" and not quantizer.static:
            entry = dynamic.get(name)
            if entry is None:
                where = "a static encoding" if name in acts else "no encoding"
                raise ValueError(f"encodings: {name} is quantized dynamically in the model but has {where}")
            want = (quantizer.spec.bits, str(quantizer.spec.symmetric), quantizer.spec.granularity)
            have = (int(entry["bitwidth"]), str(entry["is_symmetric"]), entry["granularity"])
            if want != have:
                raise ValueError(f"encodings: {name} is dynamic {have} in the encodings but {want} in the model")
            dynamic_quantizers.append(quantizer)
            continue
        if name not in section:
            extra = " (it is listed as dynamic)" if name in dynamic else ""
            raise ValueError(f"encodings: no encoding for {name}{extra}; every quantized tensor needs one "
                             "(no float fallback)")
        scale, zero_point, _, _ = decode_entries(name, section[name], quantizer.spec.bits, quantizer.spec.symmetric)
        if scale.numel() != quantizer.scale.numel():
            raise ValueError(f"encodings: {name} has {scale.numel()} entries but its quantizer needs "
                             f"{quantizer.scale.numel()} (shape {tuple(quantizer.scale.shape)}, "
                             f"{quantizer.spec.granularity})")
        layout = layouts.get(name)
        if point == "weight" and layout is not None and layout.get("shape") is not None:
            if tuple(layout["shape"]) != tuple(module.weight.shape):
                raise ValueError(f"encodings: {name} was made for shape {tuple(layout['shape'])}, the model's is "
                                 f"{tuple(module.weight.shape)}")
            if layout.get("granularity") != quantizer.spec.granularity or \
                    layout.get("group_size") != quantizer.spec.group_size:
                raise ValueError(f"encodings: {name} is {layout.get('granularity')} (group_size "
                                 f"{layout.get('group_size')}) but its quantizer is {quantizer.spec.granularity} "
                                 f"(group_size {quantizer.spec.group_size})")
        plan.append((name, quantizer, scale.to(quantizer.scale.device), zero_point.to(quantizer.scale.device)))
    declared = vlmc.get("shared_activations", {})
    actual = sharing_of(quantizers)
    for name in sorted(set(declared) ^ set(actual)):
        if name in declared:
            raise ValueError(f"encodings: {name} shares {declared[name]}'s quantizer in the encodings but has its own "
                             "in the model; set shared_inputs as in the run that made them")
        raise ValueError(f"encodings: {name} shares {actual[name]}'s quantizer in the model but the encodings give it "
                         "its own; set shared_inputs as in the run that made them")
    first_entry: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}
    for name, quantizer, scale, zero_point in plan:
        first = first_entry.setdefault(id(quantizer), (name, scale, zero_point))
        if first[0] != name and not (torch.equal(first[1], scale) and torch.equal(first[2], zero_point)):
            raise ValueError(f"encodings: {name} and {first[0]} share one quantizer but have different encodings")
    for _, quantizer, scale, zero_point in plan:  # all checked before anything changes
        quantizer.set_qparams(scale, zero_point, freeze=freeze)
    for quantizer in dynamic_quantizers:
        quantizer.enabled, quantizer.observing = True, False
