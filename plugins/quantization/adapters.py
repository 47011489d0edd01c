"""LoRA adapters on a quantized base: placement from an encodings file, PEFT injection, and the 1+N LoRA export.

The base is quantized once (QAT or PTQ) and frozen; task adapters are low-rank updates added through PEFT (QLoRA,
Dettmers et al. 2023, trains them on an NF4 base; QA-LoRA, Xu et al. 2023, on an integer grid). The fake
quantizers are placed from the encodings file alone (each tensor's bitwidth, symmetry and layout are recorded
there), so the base needs no config of its own. On device the KV cache and every layer input are quantized
tensors that both the base matmul and the LoRA branch see, so the input and output quantizers of a wrapped layer
move from the base layer onto the PEFT wrapper: the LoRA branch reads the quantized input and the output
quantizer (e.g. the KV cache on ``k_proj`` / ``v_proj``) runs after the LoRA delta is added. The names of the
quantized tensors stay the ones of the encodings file. Export follows AIMET's PEFT flow (one base encoding,
per-adapter weights): the base folder once, then ``adapters/<name>/`` in PEFT's ``save_pretrained`` layout per
task, added without touching the base or the other adapters.

Everything here is plain torch + PEFT (no Lightning), so a notebook can load a base with several adapters and
switch between them::

    loaded = load_quantized_base("exports/qat_w4a8")          # every adapter under adapters/
    set_adapter(loaded.model, "caption")
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from framework.io import atomic_directory, atomic_write_json
from framework.selection import ModuleSelection
from plugins.quantization.config import QuantSpec
from plugins.quantization.encodings import decode_entries, load_encodings
from plugins.quantization.placement import (
    INPUT,
    OUTPUT,
    WEIGHT_LAYERS,
    _input_hook,
    _output_hook,
    attach_quantizers,
    attributes_set,
    quantizers_of,
    share_quantizers,
)
from plugins.quantization.quantizer import FakeQuantizer

ADAPTERS_DIR = "adapters"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "vlmc_adapter.json"
#: Prefix PEFT's ``PeftModel.save_pretrained`` gives adapter keys; written so ``PeftModel.from_pretrained`` loads
#: an adapter folder too.
PEFT_PREFIX = "base_model.model."
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_adapter_name(name: str, key: str = "adapter_name") -> str:
    """Raises: ValueError naming ``key`` unless ``name`` is a folder-safe identifier."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{key}: must be letters, digits, '_', '-' or '.' (it names the folder "
                         f"{ADAPTERS_DIR}/<adapter_name>/), got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------- the quantized base
def read_encodings(path: str | Path, key: str = "encodings") -> dict[str, Any]:
    """The parsed ``.encodings`` file.

    Raises:
        FileNotFoundError: naming ``key`` and the path.
        ValueError: the file is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: encodings file {path} does not exist (export the QAT / PTQ base first, "
                                "e.g. `vlmc export ... --out exports/qat_w4a8`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {path} is not a JSON encodings file ({err})") from err


def _spec_of(name: str, items: list[dict[str, Any]], layout: dict[str, Any] | None,
             weight: torch.Tensor | None) -> QuantSpec:
    _, _, bits, symmetric = decode_entries(name, items)
    count = len(items)
    if layout is not None and layout.get("granularity") is not None:
        granularity, group_size = layout["granularity"], layout.get("group_size")
    elif count == 1:
        granularity, group_size = "tensor", None
    elif weight is not None and count == weight.shape[0]:
        granularity, group_size = "channel", None
    elif weight is not None and weight.numel() % count == 0:
        granularity, group_size = "group", weight.numel() // count
    else:
        raise ValueError(f"encodings: {name} has {count} entries; no layout fits the model's tensor")
    return QuantSpec(bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric)


def specs_from_encodings(model: nn.Module, encodings: dict[str, Any]) -> dict[str, QuantSpec]:
    """The quantizer spec of every tensor an encodings file names (``<module>.weight`` / ``.input`` / ``.output``).

    Raises:
        ValueError: naming the tensor: not an encodings file, a module the model does not have, a weight encoding
            on a module that is not a Linear, Embedding or convolution, a malformed entry.
    """
    for section in ("param_encodings", "activation_encodings"):
        if not isinstance(encodings.get(section), dict):
            raise ValueError(f"encodings: no {section!r} section; not an AIMET encodings file")
    vlmc = encodings.get("vlmc", {})
    layouts, dynamic = vlmc.get("layouts", {}), vlmc.get("dynamic_activations", {})
    modules = dict(model.named_modules())
    specs: dict[str, QuantSpec] = {}

    def module_of(tensor: str) -> nn.Module:
        module_name = tensor.rpartition(".")[0]
        if module_name not in modules:
            raise ValueError(f"encodings: {tensor} names module {module_name!r}, which the model does not have; "
                             "the encodings were made for another model")
        return modules[module_name]

    for name, items in encodings["param_encodings"].items():
        module = module_of(name)
        if not name.endswith(".weight") or not isinstance(module, WEIGHT_LAYERS):
            raise ValueError(f"encodings: {name} is a param encoding but {type(module).__name__} "
                             f"{name.rpartition('.')[0]} is not a Linear, Embedding or convolution weight")
        specs[name] = _spec_of(name, items, layouts.get(name), module.weight)
    for name, items in encodings["activation_encodings"].items():
        module_of(name)
        if not name.endswith((".input", ".output")):
            raise ValueError(f"encodings: activation {name} must end in '.input' or '.output'")
        specs[name] = QuantSpec(bits=decode_entries(name, items)[2], granularity="tensor",
                                symmetric=decode_entries(name, items)[3])
    for name, entry in dynamic.items():
        module_of(name)
        try:
            specs[name] = QuantSpec(bits=int(entry["bitwidth"]), granularity=entry["granularity"],
                                    group_size=entry.get("group_size"), symmetric=str(entry["is_symmetric"]) == "True",
                                    mode="dynamic")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"encodings: dynamic activation {name} is malformed ({err})") from err
    return specs


def attach_from_encodings(model: nn.Module, encodings: dict[str, Any] | str | Path, *,
                          expect: ModuleSelection | None = None, key: str = "encodings") -> dict[str, FakeQuantizer]:
    """Place a fake quantizer on every tensor the encodings name, fix them to the encodings (strict, frozen, on).

    Idempotent: a tensor that already has a quantizer of the same spec keeps it.

    Args:
        model: the HF model the encodings were made for (parameter names as in the QAT / PTQ run).
        encodings: a dict of :func:`~plugins.quantization.export_encodings` or the path of a ``.encodings`` file.
        expect: Linear layers whose weights must have an encoding (``None``: whatever the file names), so a
            tensor dropped from the file is an error instead of a layer left in float.
        key: YAML key named in errors.

    Returns:
        ``{tensor name: quantizer}``.

    Raises:
        FileNotFoundError: the file does not exist (naming ``key``).
        ValueError: naming the tensor whenever the encodings do not match the model (see
            :func:`specs_from_encodings` and :func:`~plugins.quantization.load_encodings`).

    Example::

        attach_from_encodings(model, "exports/qat_w4a8/qat.encodings")
    """
    if not isinstance(encodings, dict):
        encodings = read_encodings(encodings, key)
    specs = specs_from_encodings(model, encodings)
    if expect is not None:
        for name, module in expect.select(model, owner=f"{key}.expect_quantized").items():
            if isinstance(module, nn.Linear) and f"{name}.weight" not in specs:
                raise ValueError(f"encodings: no encoding for {name}.weight (no float fallback); every Linear of "
                                 "expect_quantized needs one, or narrow expect_quantized")
    unknown = sorted(set(quantizers_of(model)) - set(specs))
    if unknown:
        raise ValueError(f"encodings: the model already quantizes {unknown[0]}, which the encodings do not name")
    weights_by_spec: dict[str, tuple[QuantSpec, list[str]]] = {}
    for name, spec in specs.items():
        module_name, _, point = name.rpartition(".")
        if point == "weight":  # one call per spec, so tied weights (one quantizer) are placed together
            weights_by_spec.setdefault(json.dumps(spec.to_dict(), sort_keys=True), (spec, []))[1].append(module_name)
        else:
            selection = ModuleSelection(include=f"^{re.escape(module_name)}$", types=["Module"])
            attach_quantizers(model, None, spec, selection, [point], key=key)
    for spec, module_names in weights_by_spec.values():
        selection = ModuleSelection(include="^(" + "|".join(re.escape(n) for n in module_names) + ")$",
                                    types=[layer.__name__ for layer in WEIGHT_LAYERS])
        attach_quantizers(model, spec, None, selection, key=key)
    share_quantizers(model, encodings.get("vlmc", {}).get("shared_activations", {}))
    load_encodings(model, encodings, freeze=True)
    return quantizers_of(model)


BNB_KINDS = ("bnb_nf4", "bnb_int8")


def quantize_base_bnb(model: nn.Module, kind: str, targets: ModuleSelection, *, key: str = "base") -> list[str]:
    """Replace the chosen Linear layers by bitsandbytes ``Linear4bit`` (NF4, QLoRA's base) or ``Linear8bitLt``.

    Raises:
        ImportError: bitsandbytes is not installed (naming ``key``).
        ValueError: an unknown ``kind``.
    """
    if kind not in BNB_KINDS:
        raise ValueError(f"{key}: must be one of {', '.join(BNB_KINDS)}, got {kind!r}")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"{key}: {kind!r} needs bitsandbytes (`pip install bitsandbytes`); it is not importable "
                          f"here ({err}); use base: encodings (fake-quant from a QAT / PTQ export) instead") from err
    chosen = targets.select(model, owner=f"{key}_targets")
    replaced = []
    for name, module in chosen.items():
        if type(module) is not nn.Linear:
            continue
        device, dtype = module.weight.device, module.weight.dtype
        if kind == "bnb_nf4":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(module.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        layer = layer.to(device)  # quantizes the weight
        if kind == "bnb_nf4":
            layer._register_load_state_dict_pre_hook(functools.partial(_check_nf4_state, name=name), with_module=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"{key}_targets: no plain Linear layer among the {len(chosen)} selected modules")
    return replaced


def _check_nf4_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any, name: str) -> None:
    """Load-time hook of a bitsandbytes NF4 layer: a checkpoint carries its quantization state (absmax, code map,
    ...) beside the packed weight, which ``load_state_dict`` cannot put back. The layer was quantized from the same
    float base by :func:`quantize_base_bnb`, so those entries must equal its own: then they are dropped, and a
    checkpoint of another base fails here, naming the layer."""
    own = module.weight.quant_state.as_dict(packed=True)
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        field = key[len(prefix + "weight."):]
        theirs = state_dict.pop(key)
        mine = own.get(field)
        if mine is None or not torch.equal(theirs.to(mine.device), mine):
            raise ValueError(f"{name}: the checkpoint's bitsandbytes NF4 state ({field}) differs from the base "
                             "quantized here; it was trained on another base model")


@torch.no_grad()
def dequantize_bnb(model: nn.Module) -> list[str]:
    """Turn bitsandbytes layers back into ``nn.Linear`` holding the dequantized weights (the base as trained on)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            data = module.weight.data
            scb = getattr(module.weight, "SCB", None)
            scb = scb if scb is not None else getattr(module.state, "SCB", None)
            if data.dtype == torch.int8 and scb is None:
                raise ValueError(f"{name}: an int8 bitsandbytes weight without its scales (SCB) cannot be dequantized")
            weight = data.float() * scb.float()[:, None] / 127.0 if data.dtype == torch.int8 else data.float()
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = nn.Parameter(weight.to(torch.float32).reshape(module.out_features, module.in_features),
                                     requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.float().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        done.append(name)
    return done


# ---------------------------------------------------------------------------------------------- LoRA through PEFT
def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA wrapper of ``model`` by qualified name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model`` (sorted)."""
    names: set[str] = set()
    for module in lora_layers(model).values():
        names.update(module.lora_A.keys())
    return sorted(names)


def relocate_activation_quantizers(model: nn.Module) -> list[str]:
    """Move input / output quantizers from each LoRA wrapper's base layer onto the wrapper.

    The wrapper then quantizes its input before both branches and its output after ``base + delta`` (the KV
    cache as on device). The wrapper has the base layer's old name, so the tensor names (``<module>.input`` /
    ``.output``) and checkpoint keys stay those of the encodings file. Idempotent.

    Returns:
        The tensor names moved by this call.
    """
    moved = []
    for name, wrapper in lora_layers(model).items():
        base = wrapper.get_base_layer()
        for attr, point in ((INPUT, "input"), (OUTPUT, "output")):
            quantizer = base._modules.pop(attr, None)
            if quantizer is None:
                continue
            wrapper.add_module(attr, quantizer)
            moved.append(f"{name}.{point}")
        if INPUT in wrapper._modules and _input_hook not in wrapper._forward_pre_hooks.values():
            wrapper.register_forward_pre_hook(_input_hook)
        if OUTPUT in wrapper._modules and _output_hook not in wrapper._forward_hooks.values():
            wrapper.register_forward_hook(_output_hook)
    return moved


def lora_config(target_modules: list[str], r: int, alpha: float, dropout: float, **extra: Any) -> Any:
    """A ``peft.LoraConfig`` over exact qualified module names."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(target_modules),
                      bias="none", **extra)


def add_lora(model: nn.Module, config: Any, adapter_name: str, *, trainable: bool = True) -> list[str]:
    """Inject adapter ``adapter_name`` (PEFT ``inject_adapter_in_model``), move activation quantizers onto the
    wrappers, freeze everything else and make the new adapter the active one.

    Returns:
        Names of the wrapped modules.

    Raises:
        ValueError: ``adapter_name`` is already in the model.
    """
    from peft.functional import inject_adapter_in_model

    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"adapter_name: the model already has an adapter named {adapter_name!r}")
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    relocate_activation_quantizers(model)
    set_adapter(model, adapter_name)
    for param in model.parameters():
        param.requires_grad_(False)
    if trainable:
        for param in adapter_parameters(model, adapter_name).values():
            param.requires_grad_(True)
    return sorted(lora_layers(model))


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of one adapter, by qualified name."""
    marker = re.compile(rf"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.{re.escape(adapter_name)}(\.|$)")
    return {n: p for n, p in model.named_parameters() if marker.search(n)}


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every LoRA layer (the others stay loaded, inactive); all
    parameters stay frozen (inference). Training code re-enables gradients itself.

    Raises:
        ValueError: naming the adapter when the model does not have it.
    """
    from peft.functional import set_adapter as peft_set_adapter

    known = adapter_names(model)
    if adapter_name not in known:
        raise ValueError(f"adapter_name: no adapter {adapter_name!r} in the model (it has {known})")
    peft_set_adapter(model, adapter_name, inference_mode=True)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base alone: every LoRA layer skips its delta inside the block (gradients flags are untouched).

    Example::

        with torch.no_grad(), adapters_disabled(model), quantization_disabled(model):
            teacher_logits = model(**batch).logits
    """
    with attributes_set(lora_layers(model).values(), _disable_adapters=True):
        yield model


def adapter_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights with PEFT's ``save_pretrained`` keys (``base_model.model.<module>.lora_A.weight``:
    the adapter name dropped)."""
    suffix = f".{adapter_name}."
    state = {}
    for name, param in adapter_parameters(model, adapter_name).items():
        key = name.replace(suffix, ".", 1) if suffix in name else name.removesuffix(f".{adapter_name}")
        state[PEFT_PREFIX + key] = param.detach().cpu().contiguous().clone()
    return state


def remove_lora(model: nn.Module) -> list[str]:
    """Unwrap every LoRA layer (adapters dropped, not merged), activation quantizers back on the base layer.

    Returns:
        Names of the unwrapped modules.
    """
    unwrapped = []
    for name, wrapper in lora_layers(model).items():
        base = wrapper.get_base_layer()
        for attr in (INPUT, OUTPUT):
            quantizer = wrapper._modules.get(attr)
            if quantizer is not None:
                base.add_module(attr, quantizer)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
        unwrapped.append(name)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return unwrapped


def deployed_quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    """:func:`quantizers_of` with the names of the model without adapters (``.base_layer`` dropped)."""
    return {name.replace(".base_layer.", "."): q for name, q in quantizers_of(model).items()}


# ---------------------------------------------------------------------------------------------- 1+N export
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_adapter(directory: str | Path, state: dict[str, torch.Tensor], config: Any,
                  meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> list[str]:
    """Write one adapter folder atomically: ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT's
    ``save_pretrained`` layout) and ``vlmc_adapter.json`` (how it was trained, checksums).

    Raises:
        FileExistsError: the folder exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_META, {**(meta or {}), "sha256": {
            ADAPTER_WEIGHTS: _sha256(tmp / ADAPTER_WEIGHTS), ADAPTER_CONFIG: _sha256(tmp / ADAPTER_CONFIG)}})
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META]


@torch.no_grad()
def check_base_matches(model: nn.Module, folder: str | Path) -> None:
    """Check that ``folder`` holds the base ``model`` carries: its encodings (every scale and offset) and its
    deployed weights (a quantized weight as its grid values, the way the export bakes it).

    Raises:
        ValueError: naming the first tensor that differs, or a folder without a base.
    """
    folder = Path(folder)
    quantizers = deployed_quantizers(model)
    if quantizers:
        files = sorted(folder.glob("*.encodings"))
        if not files:
            raise ValueError(f"adapters_to: {folder} has no .encodings file but the adapter was trained on a "
                             "quantized base")
        reasons = [_encodings_mismatch(quantizers, read_encodings(f)) for f in files]
        if all(reasons):
            raise ValueError(f"adapters_to: the encodings in {folder} are not the ones the adapter was trained on "
                             f"({files[0].name}: {reasons[0]})")
    deployed: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if ".lora_" in name or "_quantizer." in name:
            continue
        deployed[name.replace(".base_layer.", ".")] = param
    weight_quantizers = {n[: -len(".weight")]: q for n, q in quantizers.items() if n.endswith(".weight")}
    if not (folder / "config.json").is_file():
        raise ValueError(f"adapters_to: {folder} holds no base model (config.json); export the base there first")
    # Loaded through transformers, so checkpoint key conversions of the family apply as in the run's own loading.
    from framework.models import load_vlm

    stored = dict(load_vlm(str(folder)).model.named_parameters())
    compared = 0
    for key, param in deployed.items():
        if key not in stored:
            continue
        value = param.detach()
        quantizer = weight_quantizers.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if quantizer is not None:
            value = quantizer.fake_quant(value)
        other = stored[key].detach()
        if other.shape != value.shape or not torch.equal(other.to(value.dtype), value.cpu()):
            raise ValueError(f"adapters_to: base weight {key} in {folder} differs from the base the adapter was "
                             "trained on; start the run from this folder")
        compared += 1
    if compared == 0:
        raise ValueError(f"adapters_to: no weight of {folder} matches a parameter name of the model")


def _encodings_mismatch(quantizers: dict[str, FakeQuantizer], encodings: dict[str, Any]) -> str | None:
    """``None`` when the encodings fix exactly these quantizers, else the reason."""
    params = encodings.get("param_encodings", {})
    acts = encodings.get("activation_encodings", {})
    dynamic = encodings.get("vlmc", {}).get("dynamic_activations", {})
    named = set(params) | set(acts) | set(dynamic)
    if named != set(quantizers):
        diff = sorted(named ^ set(quantizers))
        return f"{diff[0]} is quantized in only one of them"
    for name, quantizer in quantizers.items():
        if name in dynamic:
            if quantizer.is_initialized:
                return f"{name} is dynamic in the file, static in the model"
            continue
        try:
            scale, zero_point, _, _ = decode_entries(name, (params if name.endswith(".weight") else acts)[name],
                                                     quantizer.spec.bits, quantizer.spec.symmetric)
        except ValueError as err:
            return str(err)
        if not (torch.equal(scale, quantizer.scale.detach().reshape(-1).float().cpu())
                and torch.equal(zero_point, quantizer.zero_point.reshape(-1).float().cpu())):
            return f"{name} has other scales or offsets"
    return None


def add_adapter_to_export(model: nn.Module, folder: str | Path, adapter_name: str, config: Any,
                          meta: dict[str, Any] | None = None, *, check_base: bool = True,
                          overwrite: bool = False) -> Path:
    """Add ``adapters/<adapter_name>/`` to an existing base export (1+N LoRA), touching nothing else.

    Args:
        model: the trained model (base + adapter ``adapter_name``).
        folder: a base export (``vlmc export`` of a QAT / PTQ / QALFT run).
        adapter_name: the adapter to write.
        config: its ``peft.LoraConfig``.
        meta: extra fields for ``vlmc_adapter.json``.
        check_base: first check that ``folder`` holds the base ``model`` was trained on
            (:func:`check_base_matches`).
        overwrite: replace an adapter of that name.

    Returns:
        The adapter folder.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        FileExistsError: the adapter exists and ``overwrite`` is false.
        ValueError: the base in ``folder`` is not the model's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapters_to: export folder {folder} does not exist")
    check_adapter_name(adapter_name)
    target = folder / ADAPTERS_DIR / adapter_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"adapters_to: {target} exists; give the task another adapter_name or overwrite it")
    if check_base:
        check_base_matches(model, folder)
    write_adapter(target, adapter_state(model, adapter_name), config, meta, overwrite=overwrite)
    return target


# ---------------------------------------------------------------------------------------------- loading for inference
def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> str:
    """Inject and fill one adapter folder (PEFT layout) into ``model``; returns its name (default: the folder's).

    Raises:
        FileNotFoundError: the folder or one of its two files is missing.
        ValueError: its weights do not fit the model (naming the first key).
    """
    from peft import LoraConfig
    from peft.functional import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"adapter {directory}: {file} is missing")
    name = adapter_name or directory.name
    config = LoraConfig.from_pretrained(str(directory))
    add_lora(model, config, name, trainable=False)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
    expected = {k.replace(f".{name}.", "."): p for k, p in adapter_parameters(model, name).items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter {directory}: does not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    set_peft_model_state_dict(model, state, adapter_name=name)
    for key, param in adapter_parameters(model, name).items():
        if not torch.equal(param.detach().cpu(), state[key.replace(f".{name}.", ".")].to(param.dtype)):
            raise ValueError(f"adapter {directory}: {key} did not load")
    return name


def load_quantized_base(folder: str | Path, adapters: list[str] | None = None, *, encodings: str | None = None,
                        dtype: str | None = None) -> Any:
    """Load a 1+N export: the base, its fake quantizers fixed to its encodings, and adapters.

    Args:
        folder: the export folder (an HF folder with ``*.encodings`` and ``adapters/<name>/``).
        adapters: which adapters to load (default: all, sorted); the first is active.
        encodings: file name inside ``folder`` when there are several; ``None``: the only one (a folder without
            one loads a float base).
        dtype: weight dtype (see :func:`framework.models.load_vlm`).

    Returns:
        :class:`framework.models.LoadedVLM` whose ``model`` is in eval mode with every parameter frozen.

    Raises:
        FileNotFoundError: the folder, the encodings or an adapter is missing.
        ValueError: several encodings files and none named, or encodings / adapters that do not fit.

    Example::

        loaded = load_quantized_base("exports/qat_w4a8", ["autofill", "caption"])
        set_adapter(loaded.model, "caption")
    """
    from framework.models import load_vlm

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist")
    loaded = load_vlm(str(folder), dtype=dtype)
    model = loaded.model
    if encodings is not None:
        attach_from_encodings(model, folder / encodings)
    else:
        files = sorted(folder.glob("*.encodings"))
        if len(files) > 1:
            raise ValueError(f"encodings: {folder} holds {[f.name for f in files]}; name the one of the base")
        if files:
            attach_from_encodings(model, files[0])
    available = sorted(p.name for p in (folder / ADAPTERS_DIR).glob("*") if (p / ADAPTER_CONFIG).is_file())
    chosen = available if adapters is None else list(adapters)
    for name in chosen:
        if name not in available:
            raise FileNotFoundError(f"adapters: {folder / ADAPTERS_DIR / name} does not exist (have {available})")
        load_adapter(model, folder / ADAPTERS_DIR / name, name)
    if chosen:
        set_adapter(model, chosen[0])
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return loaded


# ---------------------------------------------------------------------------------------------- distillation
