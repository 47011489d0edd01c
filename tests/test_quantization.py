"""Quantization plugins: PyTorch-exact fake quant, LSQ, placement, QAT / PTQ runs, encodings, integer runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import FAMILY_SPECS
from conftest import ROOT as ROOT_DIR
from helpers import StopAt, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.export import export_model
from framework.metrics import Top1Agreement
from framework.models import load_vlm
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from framework.storage import load_unpacked
from plugins.quantization import (
    ActivationSite,
    FakeQuantizer,
    IntegerRuntime,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantSpec,
    attach_quantizers,
    export_encodings,
    load_encodings,
    quantization_disabled,
    quantizers_of,
)
from plugins.quantization.common import freeze_observers
from plugins.quantization.encodings import decode_entries
from plugins.quantization.placement import QuantLinear
from plugins.quantization.quantizer import qparams_from_range

QAT = "plugins.quantization.QuantizationAwareTraining"
PTQ = "plugins.quantization.PostTrainingQuantization"
NO_VAL = {"limit_val_batches": 0}
KV = {"include": r"language_model.*(k_proj|v_proj)$"}
PROJECTOR = {"include": r"multi_modal_projector$", "types": ["Module"]}


def _plugin(cli, cls: type):  # noqa: ANN001, ANN202
    return next(c for c in cli.trainer.callbacks if isinstance(c, cls))


def _batch(loaded):  # noqa: ANN001, ANN202
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    return processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[1]])


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"bits": 1}}, r"QuantSpec.bits: must be in \[2, 16\]"),
        ({"weights": {"bits": 12}}, r"QuantizationAwareTraining.weights.bits: must be in \[2, 8\] for weights"),
        ({"activations": {"bits": 2, "granularity": "tensor"}},
         r"QuantizationAwareTraining.activations.bits: must be in \[4, 16\] for activations"),
        ({"weights": {"granularity": "row"}}, r"QuantSpec.granularity: must be one of 'tensor', 'channel'"),
        ({"weights": {"mode": "lazy"}}, r"QuantSpec.mode: must be one of 'static', 'dynamic'"),
        ({"weights": {"observer": "kl"}}, r"QuantSpec.observer: must be one of 'minmax', 'percentile', 'mse'"),
        ({"weights": {"granularity": "group"}}, r"QuantSpec.group_size: granularity 'group' needs an integer"),
        ({"weights": {"group_size": 8}}, r"QuantSpec.group_size: only used with granularity 'group'"),
        ({"weights": {"granularity": "token", "mode": "dynamic"}},
         r"weights.granularity: weights may use 'tensor', 'channel', 'group'"),
        ({"activations": {"granularity": "group", "group_size": 8}},
         r"activations.granularity: static activation encodings are per tensor"),
        ({"weights": {"symmetric": False}, "runtime": "qnn"},
         r"QuantizationAwareTraining.weights.symmetric: runtime 'qnn' takes symmetric weight encodings only"),
        ({"activations": {"granularity": "token", "mode": "dynamic"}, "runtime": "qnn"},
         r"activations.mode: runtime 'qnn' compiles fixed encodings"),
        ({"runtime": "tflite"}, r"runtime: must be one of 'generic', 'qnn'"),
        ({"integer_eval": "yes"}, r"QuantizationAwareTraining.integer_eval: must be true or false"),
        ({"start_step": -1}, r"QuantizationAwareTraining.start_step: must be an integer >= 0"),
        ({"activations": {"granularity": "tensor"}, "calibration_batches": 0},
         r"calibration_batches: static activation quantizers need >= 1"),
        ({"freeze_observers_at": 1.5}, r"freeze_observers_at: a fraction of training must be in \(0, 1\]"),
        ({"activation_points": ["middle"]}, r"activation_points: must be a non-empty list of 'input' / 'output'"),
        ({"weights": None}, r"QuantizationAwareTraining: nothing to quantize"),
        ({"scale_lr": -1.0}, r"QuantizationAwareTraining.scale_lr: must be a positive number"),
        ({"learn_scales_max_bits": 1}, r"QuantizationAwareTraining.learn_scales_max_bits: must be an integer in "
                                       r"\[2, 16\], got 1"),
    ],
)
def test_misconfiguration_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**{k: QuantSpec(**v) if isinstance(v, dict) else v for k, v in kwargs.items()})


def test_model_dependent_checks_fail_in_transform() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    plugin = QuantizationAwareTraining(weights=QuantSpec(bits=4, granularity="group", group_size=24))
    with pytest.raises(ValueError, match=r"qat.weights.group_size: 24 does not divide the 32 inputs of "
                                         r"model.language_model.layers.0.self_attn.q_proj"):
        plugin.transform(model)
    with pytest.raises(ValueError, match=r"ptq.targets: include='nothing' .* matched no module"):
        PostTrainingQuantization(targets=ModuleSelection(include="nothing")).transform(model)
    with pytest.raises(ValueError, match=r"already quantized with .*bits=8.*asks for .*bits=4"):
        attach_quantizers(model, QuantSpec(bits=8), targets=ModuleSelection(include="lm_head"))
        attach_quantizers(model, QuantSpec(bits=4), targets=ModuleSelection(include="lm_head"))


# ---------------------------------------------------------------------------------------------- pure torch
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fake_quant_equals_torch(bits: int, symmetric: bool, granularity: str) -> None:
    torch.manual_seed(bits)
    w = torch.randn(16, 40) * torch.rand(16, 1) * 3 + 0.3
    quantizer = FakeQuantizer(QuantSpec(bits=bits, granularity=granularity, symmetric=symmetric), shape=w.shape)
    quantizer.calibrate(w)
    qmin, qmax = quantizer.quant_range
    ours = quantizer(w * 1.3)  # also outside the calibrated range: clipping matches too
    if granularity == "tensor":
        want = torch.fake_quantize_per_tensor_affine(w * 1.3, float(quantizer.scale.detach()), int(quantizer.zero_point),
                                                     qmin, qmax)
        observer = torch.ao.quantization.MinMaxObserver(
            dtype=torch.qint32, qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
            quant_min=qmin, quant_max=qmax)
    else:
        want = torch.fake_quantize_per_channel_affine(w * 1.3, quantizer.scale.detach().reshape(-1),
                                                      quantizer.zero_point.reshape(-1).int(), 0, qmin, qmax)
        observer = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint32,
            qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine,
            quant_min=qmin, quant_max=qmax)
    torch.testing.assert_close(ours, want, atol=0, rtol=0)
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    torch.testing.assert_close(quantizer.scale.detach().reshape(-1), scale.reshape(-1), atol=0, rtol=0)
    torch.testing.assert_close(quantizer.zero_point.reshape(-1), zero_point.reshape(-1).float(), atol=0, rtol=0)


def test_lsq_gradient_matches_torch_learnable_fake_quant() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    quantizer = FakeQuantizer(QuantSpec(bits=4, granularity="tensor", symmetric=False), shape=x.shape)
    quantizer.calibrate(x.detach() * 0.7)  # some values clip
    quantizer(x).pow(2).sum().backward()
    qmin, qmax = quantizer.quant_range
    factor = 1.0 / (x.numel() * qmax) ** 0.5
    x2 = x.detach().clone().requires_grad_(True)
    scale = quantizer.scale.detach().clone().requires_grad_(True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(x2, scale, quantizer.zero_point.clone(), qmin, qmax, factor)
    ref.pow(2).sum().backward()
    assert quantizer.scale.grad is not None and float(quantizer.scale.grad.abs().sum()) > 0
    torch.testing.assert_close(quantizer.scale.grad.reshape(-1), scale.grad.reshape(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)  # straight through inside, zero where clipped
    assert (x.grad == 0).any()


def _lsq_reference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSQ written out: rows of ``x`` share ``scale[row]``; returns (output, grad of x, grad of scale)."""
    v = x * (1.0 / scale)  # the kernels multiply by the reciprocal
    rounded = torch.round(v)
    q = rounded + zero_point
    low, high = q < qmin, q > qmax
    out = (q.clamp(qmin, qmax) - zero_point) * scale
    grad_x = grad_out * ~(low | high)
    local = torch.where(low, qmin - zero_point, torch.where(high, qmax - zero_point, rounded - v))
    grad_scale = (grad_out * local).sum(1, keepdim=True) / (x.shape[1] * qmax) ** 0.5
    return out, grad_x, grad_scale


@pytest.mark.parametrize(("granularity", "bits", "symmetric"),
                         [("tensor", 8, False), ("channel", 4, True), ("group", 2, True), ("channel", 16, False)])
def test_fused_fake_quant_gradients_are_lsq(granularity: str, bits: int, symmetric: bool) -> None:
    """Training's fake quantization gives LSQ's output and input gradient exactly, its scale gradient to float
    rounding, and so do PyTorch's fused per-channel kernels over the same rows."""
    torch.manual_seed(bits)
    w = torch.randn(24, 64) * 2
    quantizer = FakeQuantizer(QuantSpec(bits=bits, granularity=granularity, symmetric=symmetric,
                                        group_size=16 if granularity == "group" else None),
                              shape=w.shape)
    quantizer.calibrate(w * 0.6)  # a tighter range than w: some values clip
    quantizer.scale.requires_grad_(True)
    x = w.clone().requires_grad_(True)
    grad_out = torch.randn_like(w)
    quantizer(x).backward(grad_out)
    rows = quantizer._rows(w)
    scale, zero_point = (t.detach() for t in quantizer.qparams(w))
    out, grad_x, grad_scale = _lsq_reference(rows, scale, zero_point, *quantizer.quant_range,
                                             quantizer._rows(grad_out))
    torch.testing.assert_close(quantizer(w).detach(), out.reshape(w.shape), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, grad_x.reshape(w.shape), atol=0, rtol=0)
    assert (x.grad == 0).any() and (x.grad != 0).any()
    torch.testing.assert_close(quantizer.scale.grad.reshape(-1), grad_scale.reshape(-1), rtol=1e-4, atol=1e-5)
    fused_x, fused_scale = w.clone().requires_grad_(True), scale.reshape(-1).clone().requires_grad_(True)
    qmin, qmax = quantizer.quant_range
    fused = torch._fake_quantize_learnable_per_channel_affine(quantizer._rows(fused_x), fused_scale,
                                                              zero_point.reshape(-1), 0, qmin, qmax,
                                                              1.0 / (rows.shape[1] * qmax) ** 0.5)
    fused.backward(quantizer._rows(grad_out))
    torch.testing.assert_close(fused.detach().reshape(w.shape), out.reshape(w.shape), atol=0, rtol=0)
    torch.testing.assert_close(fused_x.grad, x.grad, atol=0, rtol=0)
    torch.testing.assert_close(fused_scale.grad, quantizer.scale.grad.reshape(-1), rtol=1e-4, atol=1e-5)


def test_activation_quantizer_recomputes_what_a_weight_quantizer_keeps() -> None:
    """Activation quantizers (no fixed shape) keep only their input for backward and recompute the rest; weight
    quantizers keep output and mask. Both give the same values and LSQ gradients, in the input's dtype."""
    torch.manual_seed(0)
    x = torch.randn(32, 40) * 2
    spec = QuantSpec(bits=8, granularity="tensor", symmetric=False)
    kept, recomputed = FakeQuantizer(spec, shape=x.shape), FakeQuantizer(spec)
    grad_out = torch.randn_like(x)
    results = []
    for quantizer in (kept, recomputed):
        quantizer.calibrate(x * 0.6)
        quantizer.scale.requires_grad_(True)
        for dtype in (torch.float32, torch.bfloat16):
            inp = x.to(dtype).clone().requires_grad_(True)
            out = quantizer(inp)
            out.backward(grad_out.to(dtype))
            assert out.dtype == inp.grad.dtype == dtype
            results.append((out.detach(), inp.grad, quantizer.scale.grad.clone()))
            quantizer.scale.grad = None
    for a, b in zip(results[:2], results[2:]):
        for left, right in zip(a, b):
            torch.testing.assert_close(left, right, atol=0, rtol=0)


def test_observer_reads_its_count_back_once() -> None:
    """Calibration folds batches in without reading the count from the device each time; a loaded count wins."""
    x = torch.randn(16, 32)
    quantizer = FakeQuantizer(QuantSpec(bits=8, granularity="tensor", symmetric=False))
    quantizer.observe(x)
    with torch.profiler.profile() as profile:
        quantizer.observe(x * 2)
        quantizer.observe(x * 3)
    assert not {e.key for e in profile.key_averages()} & {"aten::item", "aten::_local_scalar_dense"}
    assert quantizer.observed_batches == int(quantizer.obs_count) == 3
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    state["obs_count"].fill_(7)
    quantizer.load_state_dict(state)
    assert quantizer.observed_batches == 7
    quantizer.calibrate(x)
    assert quantizer.observed_batches == int(quantizer.obs_count) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_cuda_fake_quant_is_exact_and_never_synchronises(granularity: str) -> None:
    """On a GPU one scale takes PyTorch's tensor-qparams kernel: same values and gradients as the CPU path, and no
    host-device synchronisation in forward or backward (CUDA's sync debug mode raises on one)."""
    torch.manual_seed(0)
    x = torch.randn(64, 96) * 2
    quantizer = FakeQuantizer(QuantSpec(bits=8, granularity=granularity, symmetric=False), shape=x.shape)
    quantizer.calibrate(x * 0.6)
    quantizer.scale.requires_grad_(True)
    grad_out = torch.randn_like(x)
    cpu_x = x.clone().requires_grad_(True)
    quantizer(cpu_x).backward(grad_out)
    cpu_scale_grad = quantizer.scale.grad.clone()
    quantizer.scale.grad = None
    quantizer.cuda()
    cuda_x = x.cuda().requires_grad_(True)
    quantizer(cuda_x)  # the host copy of `initialized` is read once, before the checked pass
    cuda_grad = grad_out.cuda()  # a copy from pageable host memory synchronises: made before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = quantizer(cuda_x)
        out.backward(cuda_grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.detach().cpu(), quantizer.cpu()(x).detach(), atol=0, rtol=0)
    torch.testing.assert_close(cuda_x.grad.cpu(), cpu_x.grad, atol=0, rtol=0)
    torch.testing.assert_close(quantizer.scale.grad.cpu(), cpu_scale_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="channel"),
                                  QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                  QuantSpec(bits=8, granularity="token", mode="dynamic", symmetric=False)],
                         ids=["static-channel", "static-tensor", "dynamic-token"])
def test_fake_quant_training_never_reads_back_to_the_host(spec: QuantSpec) -> None:
    """A read-back (``.item()``) is a host-device sync on a GPU; a QAT step runs hundreds of quantizers, and
    PyTorch's fused kernels' read-backs made it 2.3x a plain step."""
    x = torch.randn(32, 48, requires_grad=True)
    quantizer = FakeQuantizer(spec, shape=x.shape if spec.mode == "static" else None)
    if quantizer.scale is not None and spec.mode == "static":
        quantizer.calibrate(x.detach())
    quantizer(x).sum().backward()  # first call: the host copy of `initialized` is read once
    with torch.profiler.profile() as profile:
        quantizer(x).pow(2).sum().backward()
    names = {event.key for event in profile.key_averages()}
    assert "aten::_fake_quantize_learnable_per_channel_affine" not in names
    assert not names & {"aten::item", "aten::_local_scalar_dense"}, sorted(names)


def test_compiled_activation_scale_gradient_has_no_host_arithmetic() -> None:
    """Under a dynamic-shape compile an activation's element count is symbolic. LSQ's 1 / sqrt(N * quant_max) of
    it was traced as host (CPU) scalar kernels inside the compiled backward, which CUDA graphs cannot replay (a QAT
    step under CUDA graphs crashed in such a kernel). It is now computed on the input's device."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def record(graph: torch.fx.GraphModule, _: object) -> object:
        graphs.append(graph)
        return graph.forward

    torch.manual_seed(0)
    quantizer = FakeQuantizer(QuantSpec(bits=8, granularity="tensor", symmetric=False))
    quantizer.calibrate(torch.randn(4, 7, 16))
    compiled = torch.compile(quantizer, backend=aot_autograd(fw_compiler=record, bw_compiler=record), dynamic=True)
    for shape in ((4, 7, 16), (3, 9, 16)):  # the second shape runs the symbolic graph
        x = torch.randn(*shape) * 2
        grads = []
        for run in (quantizer, compiled):
            quantizer.scale.grad = None
            leaf = x.clone().requires_grad_(True)
            run(leaf).pow(2).sum().backward()
            grads.append((leaf.grad, quantizer.scale.grad.clone()))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=0)
    targets = {node.target for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}
    assert torch.ops.aten.rsqrt.default in targets
    assert torch.ops.aten.sqrt.default not in targets
    for node in (n for graph in graphs for n in graph.graph.nodes if n.target is torch.ops.aten.scalar_tensor.default):
        assert isinstance(node.args[0], (int, float)), f"a scalar computed on the host: {node.format_node()}"


def test_group_and_dynamic_token_by_hand() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    q = FakeQuantizer(QuantSpec(bits=4, granularity="group", group_size=8), shape=w.shape)
    q.calibrate(w)
    assert q.scale.shape == (4, 2, 1)
    for row in range(4):
        for g in range(2):
            block = w[row, g * 8:(g + 1) * 8]
            scale = block.abs().max() / 7.5  # symmetric 4 bit: max / ((7 - -8) / 2)
            want = torch.clamp(torch.round(block * (1.0 / scale)), -8, 7) * scale
            torch.testing.assert_close(q(w)[row, g * 8:(g + 1) * 8], want, atol=0, rtol=0)
    x = torch.randn(2, 3, 16) * 5
    dyn = FakeQuantizer(QuantSpec(bits=8, granularity="token", mode="dynamic", symmetric=False))
    out = dyn(x)
    for b in range(2):
        for t in range(3):
            row = x[b, t]
            lo, hi = row.min().clamp(max=0.0), row.max().clamp(min=0.0)  # float32, as the quantizer computes
            scale = (hi - lo) / 255.0
            zp = torch.clamp(0 - torch.round(lo / scale), 0, 255)
            want = (torch.clamp(torch.round(row * (1.0 / scale)) + zp, 0, 255) - zp) * scale
            torch.testing.assert_close(out[b, t], want, atol=0, rtol=0)


def test_observers_percentile_and_mse_clip_outliers() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096)
    x[0] = 80.0
    ranges = {}
    for observer in ("minmax", "percentile", "mse"):
        q = FakeQuantizer(QuantSpec(bits=4, granularity="tensor", observer=observer, percentile=99.9))
        q.observing = True
        q(x)
        q(x * 0.5)
        q.freeze_observer()
        ranges[observer] = float(q.scale)
        q.enabled = True
        ranges[observer + "_err"] = float((q(x) - x)[1:].pow(2).mean())
    assert ranges["percentile"] < ranges["minmax"] and ranges["mse"] < ranges["minmax"]
    assert ranges["mse_err"] < ranges["minmax_err"]


# ---------------------------------------------------------------------------------------------- placement
def test_placement_keeps_names_and_float_context() -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model.eval()
    names = set(model.state_dict())
    batch = _batch(loaded)
    float_logits = model(**batch).logits
    found = attach_quantizers(model, QuantSpec(bits=4), None, ModuleSelection(include="language_model",
                                                                              exclude="lm_head"))
    attach_quantizers(model, None, QuantSpec(bits=8, granularity="token", mode="dynamic"),
                      ModuleSelection(**KV), ["output"])
    attach_quantizers(model, None, QuantSpec(bits=8, granularity="token", mode="dynamic"),
                      ModuleSelection(**PROJECTOR), ["output"])
    assert len(found) == 14 and names <= set(model.state_dict())
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.endswith("q_proj"))
    quantizers = quantizers_of(model)
    assert "model.multi_modal_projector.output" in quantizers
    assert "model.language_model.layers.1.self_attn.v_proj.output" in quantizers
    for name, q in quantizers.items():
        q.enabled = True
        if q.static:
            q.calibrate(model.get_submodule(name[: -len(".weight")]).weight)
    quant_logits = model(**batch).logits
    assert not torch.equal(quant_logits, float_logits)
    with quantization_disabled(model):
        torch.testing.assert_close(model(**batch).logits, float_logits, atol=0, rtol=0)
    assert all(q.enabled for q in quantizers.values())


def test_peft_lora_wraps_quantized_linear() -> None:
    peft = pytest.importorskip("peft")
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    attach_quantizers(model, QuantSpec(bits=4), None, ModuleSelection(include=r"language_model.*q_proj$"))
    for name, q in quantizers_of(model).items():
        q.calibrate(model.get_submodule(name[: -len(".weight")]).weight)
        q.enabled = True
    config = peft.LoraConfig(r=4, target_modules=r".*language_model.*q_proj")
    wrapped = peft.get_peft_model(model, config)
    assert len(quantizers_of(wrapped)) == 2
    wrapped(**_batch(loaded)).logits.sum().backward()


# ---------------------------------------------------------------------------------------------- fits
def _qat(weights: dict, activations: dict | None = None, **kwargs) -> dict:  # noqa: ANN003
    return {"class_path": QAT, "init_args": {"weights": weights, "activations": activations, **kwargs}}


def test_qat_fit_weights_on_grid_and_export(tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    qat = _qat({"bits": 4, "granularity": "channel"}, {"bits": 8, "granularity": "tensor", "symmetric": False},
               start_step=2, calibration_batches=2, freeze_observers_at=0.75, scale_lr=1e-2,
               activation_sites=[{"targets": KV, "points": ["output"],
                                  "spec": {"bits": 8, "granularity": "token", "mode": "dynamic"}},
                                 {"targets": PROJECTOR, "points": ["output"]}])
    config = tiny_config(tmp_path, max_steps=8, callbacks=[qat], **NO_VAL)
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = _plugin(cli, QuantizationAwareTraining)
    assert plugin.started and all(q.is_initialized for q in plugin.quantizers.values() if q.static)
    logged = cli.trainer.callback_metrics
    assert float(logged["compression/qat/active"]) == 1.0 and float(logged["compression/qat/frozen"]) == 1.0
    optimizer = cli.trainer.optimizers[0]
    assert any(g["lr"] != optimizer.param_groups[0]["lr"] for g in optimizer.param_groups)
    summary = plugin.summary(cli.model.model)
    assert summary["weight_bits"] == 4.0 and summary["weight_quantizers"] == 14
    assert summary["activation_quantizers"] == 14 + 4 + 1
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    out = tmp_path / "export"
    encodings = json.loads((out / "qat.encodings").read_text())
    assert encodings["version"] == "0.6.1" and len(encodings["param_encodings"]) == 14
    assert "model.multi_modal_projector.output" in encodings["activation_encodings"]
    assert "model.language_model.layers.0.self_attn.k_proj.output" in encodings["vlmc"]["dynamic_activations"]
    entry = encodings["activation_encodings"]["model.language_model.layers.0.mlp.down_proj.input"][0]
    assert set(entry) == {"bitwidth", "dtype", "is_symmetric", "scale", "offset", "min", "max"}
    assert entry["is_symmetric"] == "False" and entry["dtype"] == "int"
    exported = AutoModelForImageTextToText.from_pretrained(out).state_dict()
    codes = load_unpacked(out / "qat_int_weights.safetensors")
    for name, items in encodings["param_encodings"].items():
        scale, zero_point, bits, _ = decode_entries(name, items)
        q = codes[name].to(torch.int64)
        assert len(items) == q.shape[0] and q.min() >= -8 and q.max() <= 7, name
        torch.testing.assert_close(exported[name], (q - zero_point[:, None]) * scale[:, None], atol=0, rtol=0)
    report = json.loads((out / "qat_bpv.json").read_text())
    assert report["summary"]["value_bits"] == 4 and report["summary"]["bpv"] <= 4.0
    manifest = json.loads((out / "vlmc_export.json").read_text())
    assert manifest["plugins"]["qat"]["files"] == ["qat.encodings", "qat_int_weights.safetensors", "qat_bpv.json"]


def test_qat_learns_scales_up_to_8_bits_and_keeps_wider_ones_calibrated(tmp_path: Path) -> None:
    qat = _qat({"bits": 4, "granularity": "channel"}, {"bits": 16, "granularity": "tensor", "symmetric": False},
               calibration_batches=1, scale_lr=1e-2)
    cli = make_cli(tiny_config(tmp_path, max_steps=4, callbacks=[qat], **NO_VAL))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = _plugin(cli, QuantizationAwareTraining)
    weights = {n: q for n, q in plugin.quantizers.items() if n.endswith(".weight")}
    acts = {n: q for n, q in plugin.quantizers.items() if not n.endswith(".weight")}
    assert all(q.scale.requires_grad for q in weights.values())
    assert all(q.is_initialized and not q.scale.requires_grad for q in acts.values())
    in_optimizer = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(q.scale) in in_optimizer for q in acts.values())
    # The 16-bit scales are exactly what calibration set: the observed range over the 16-bit grid.
    for quantizer in acts.values():
        scale, _ = qparams_from_range(quantizer.obs_min, quantizer.obs_max, *quantizer.quant_range, False)
        torch.testing.assert_close(quantizer.scale.detach(), scale.reshape(quantizer.scale.shape), atol=0, rtol=0)


def test_qat_settles_after_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once calibration is over, learning steps set the same flags every time: they skip the walk over every
    quantizer (host time on a GPU), until a validation changes the flags and the next step sets them again."""
    walks: list[int] = []
    original = QuantizationAwareTraining.uncalibrated_weights

    def counting(self, model):  # noqa: ANN001, ANN202
        walks.append(self._step_seen)
        return original(self, model)

    def seen(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN202
        self._step_seen = trainer.global_step
        return on_batch_start(self, trainer, pl_module, batch, batch_idx)

    on_batch_start = QuantizationAwareTraining.on_train_batch_start
    monkeypatch.setattr(QuantizationAwareTraining, "uncalibrated_weights", counting)
    monkeypatch.setattr(QuantizationAwareTraining, "on_train_batch_start", seen)
    qat = _qat({"bits": 4, "granularity": "channel"}, {"bits": 8, "granularity": "tensor", "symmetric": False},
               start_step=1, calibration_batches=2)
    cli = make_cli(tiny_config(tmp_path, max_steps=10, callbacks=[qat], val_check_interval=6))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # Step 1 calibrates the weights (a second walk inside that), steps 1-2 observe, step 3 freezes and settles; the
    # validation after step 6 unsettles, and step 6 settles again.
    assert walks == [1, 1, 2, 3, 6], walks
    plugin = _plugin(cli, QuantizationAwareTraining)
    assert all(q.enabled and not q.observing for q in plugin.quantizers.values())


def test_qat_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    qat = _qat({"bits": 4, "granularity": "group", "group_size": 16},
               {"bits": 8, "granularity": "tensor", "symmetric": False, "observer": "percentile"},
               start_step=1, calibration_batches=4, freeze_observers_at=8)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = make_cli(tiny_config(straight_dir, max_steps=10, callbacks=[qat], **NO_VAL))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    interrupted = make_cli(tiny_config(resumed_dir, max_steps=10, callbacks=[qat], **NO_VAL))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    mid = _plugin(interrupted, QuantizationAwareTraining)
    assert not all(q.is_initialized for q in mid.static_quantizers("activation").values()), "stopped mid-calibration"
    resumed = make_cli(tiny_config(resumed_dir, max_steps=10, callbacks=[qat], **NO_VAL))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule,
                        ckpt_path=str(resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"))
    want, got = model_state(straight.model), model_state(resumed.model)
    assert want.keys() == got.keys() and any(k.endswith("weight_quantizer.scale") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    other = QuantizationAwareTraining(weights=QuantSpec(bits=8), start_step=1)
    with pytest.raises(ValueError, match="another quantization configuration .*weights"):
        other.load_state_dict(_plugin(straight, QuantizationAwareTraining).state_dict())


def test_ptq_via_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ptq = {"class_path": PTQ, "init_args": {"weights": {"bits": 4, "observer": "mse"},
                                            "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
                                            "calibration_batches": 2}}
    config = tiny_config(tmp_path, callbacks=[ptq])
    main(["validate", "--config", str(config)])
    assert "val/autofill" in capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    result = summary["plugins"]["ptq"]
    assert result["calibrated"] == 1 and result["weight_bits"] == 4.0 and result["quantizers"] == 28


def test_validation_reports_top1_agreement_with_the_float_model(tmp_path: Path) -> None:
    agreement = {}
    for bits in (8, 2):
        ptq = {"class_path": PTQ, "init_args": {"weights": {"bits": bits}, "calibration_batches": 1}}
        folder = tmp_path / f"w{bits}"
        folder.mkdir()
        main(["validate", "--config", str(tiny_config(folder, callbacks=[ptq]))])
        summary = json.loads(next(folder.rglob("summary.json")).read_text())
        result = summary["plugins"]["ptq"]
        agreement[bits] = result["top1_agreement"]
        # All positions = decided ones + near-ties, whose agreement lies somewhere in [0, 1].
        # (An untrained tiny model is unsure everywhere: with no decided position that agreement is not reported.)
        share, decided = result["near_tie_share"], result.get("top1_agreement_decided", 0.0)
        assert 0.0 <= share <= 1.0
        assert (1 - share) * decided - 1e-6 <= agreement[bits] <= (1 - share) * decided + share + 1e-6
    assert 0.0 <= agreement[2] < agreement[8] <= 1.0
    assert agreement[8] > 0.9  # 8-bit weights barely move the argmax


def test_near_ties_compare_the_top_two_probabilities() -> None:
    from plugins.quantization.common import near_ties

    probs = torch.tensor([[0.50, 0.45, 0.05], [0.80, 0.15, 0.05], [0.40, 0.35, 0.25]])
    assert near_ties(probs.log()).tolist() == [True, False, True]
    assert near_ties(probs.log(), margin=0.04).tolist() == [False, False, False]


def test_ptq_export_calibrates_on_the_runs_data_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ptq = {"class_path": PTQ, "init_args": {"weights": {"bits": 4}, "calibration_batches": 2,
                                            "activations": {"bits": 8, "granularity": "tensor", "symmetric": False}}}
    main(["export", "--config", str(tiny_config(tmp_path, callbacks=[ptq])), "--out", str(tmp_path / "export")])
    assert "PostTrainingQuantization finish on data first" in capsys.readouterr().out
    encodings = json.loads((tmp_path / "export" / "ptq.encodings").read_text())
    assert len(encodings["param_encodings"]) == 14 and len(encodings["activation_encodings"]) == 14


def test_integer_eval_validates_with_device_arithmetic(tmp_path: Path) -> None:
    summaries = {}
    for integer_eval in (False, True):
        ptq = {"class_path": PTQ, "init_args": {
            "weights": {"bits": 4}, "calibration_batches": 1, "integer_eval": integer_eval,
            "activations": {"bits": 8, "granularity": "tensor", "symmetric": False}}}
        folder = tmp_path / str(integer_eval)
        folder.mkdir()
        cli = make_cli(tiny_config(folder, callbacks=[ptq]))
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
        layers = [m for m in cli.model.model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(layer.integer_exact is integer_eval for layer in layers)
        summaries[integer_eval] = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "loss" in k}
    # The same quantized model, computed with integer codes instead of dequantized floats: rounding differs only.
    for key, value in summaries[False].items():
        assert summaries[True][key] == pytest.approx(value, rel=1e-3), key


def test_agreement_against_a_float_reference_model(tmp_path: Path) -> None:
    # The untrained float model, exported: the same weights every run of the config starts from (seeded build).
    (tmp_path / "float").mkdir()
    main(["export", "--config", str(tiny_config(tmp_path / "float")), "--out", str(tmp_path / "float_export")])
    results = {}
    for label, reference in (("self", None), ("export", str(tmp_path / "float_export"))):
        ptq = {"class_path": PTQ, "init_args": {"weights": {"bits": 4}, "calibration_batches": 1,
                                                "float_reference": reference}}
        folder = tmp_path / label
        folder.mkdir()
        main(["validate", "--config", str(tiny_config(folder, callbacks=[ptq]))])
        results[label] = json.loads(next(folder.rglob("summary.json")).read_text())["plugins"]["ptq"]
    # PTQ's weights are the float model's: its own quantizers-off forward and the reference are the same model.
    assert results["export"]["top1_agreement"] == results["self"]["top1_agreement"]
    assert results["export"]["float_reference"].endswith("float_export") and "float_reference" not in results["self"]
    # A reference of another architecture, or one that does not exist, fails naming the key.
    (tmp_path / "wide").mkdir()
    wide = {"class_path": PTQ, "init_args": {"calibration_batches": 1,
                                             "float_reference": "experiments/models/qwen2vl-test.json"}}
    with pytest.raises(ValueError, match=r"PostTrainingQuantization.float_reference: .*qwen2vl-test.json is a "
                                         r"Qwen2VLForConditionalGeneration, the trained model a Llava"):
        main(["validate", "--config", str(tiny_config(tmp_path / "wide", callbacks=[wide]))])
    (tmp_path / "missing").mkdir()
    missing = {"class_path": PTQ, "init_args": {"calibration_batches": 1, "float_reference": str(tmp_path / "nope")}}
    with pytest.raises((FileNotFoundError, OSError, ValueError), match=r"PostTrainingQuantization.float_reference"):
        main(["validate", "--config", str(tiny_config(tmp_path / "missing", callbacks=[missing]))])


# ---------------------------------------------------------------------------------------------- encodings
def _quantized_model(weights: QuantSpec, activations: QuantSpec | None, kv: QuantSpec | None = None,  # noqa: ANN202
                     shared_inputs: list[list[str]] | None = None, targets: ModuleSelection | None = None,
                     integer_eval: bool = False):
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    torch.manual_seed(0)
    plugin = PostTrainingQuantization(
        weights=weights, activations=activations, targets=targets or ModuleSelection(include="language_model"),
        activation_sites=[ActivationSite(ModuleSelection(**KV), ["output"], kv)] if kv else None,
        shared_inputs=shared_inputs, integer_eval=integer_eval)
    plugin.transform(loaded.model)
    model = loaded.model.eval()
    batch = _batch(loaded)
    plugin.init_weight_quantizers(model)
    pending = list(plugin.static_quantizers("activation").values())
    for q in plugin.quantizers.values():
        q.enabled = not q.static or q.is_initialized
        q.observing = q in pending
    model(**batch)
    freeze_observers(pending)  # a shared quantizer once
    for q in plugin.quantizers.values():
        q.enabled, q.observing = True, False
    return loaded, plugin, batch


def test_runtime_check_compares_an_export_on_validation_samples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from plugins.quantization.runtime import main as runtime_main

    loaded, plugin, _ = _quantized_model(QuantSpec(bits=4, granularity="channel"),
                                         QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                         QuantSpec(bits=8, granularity="token", mode="dynamic"))
    out = export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    args = [str(out), "--tasks", "autofill", "longcall", "--samples", "3", "--batch_size", "2", "--image_size", "64",
            "--max_length", "4096"]
    # Default: the fake-quant model in integer-exact mode computes what the runtime computes, bit for bit.
    result = runtime_main([*args, "--out", str(tmp_path / "check.json")])
    assert result["mode"] == "integer_exact" and set(result["tasks"]) == {"autofill", "longcall"}
    overall = result["overall"]
    assert overall["positions"] == sum(r["positions"] for r in result["tasks"].values()) > 0
    assert overall["top1_all"] == overall["top1_answer"] == 1.0
    assert overall["share_positions_identical"] == 1.0 and overall["max_abs_diff"] == 0.0
    assert json.loads((tmp_path / "check.json").read_text())["overall"] == overall
    assert "overall" in capsys.readouterr().out
    # --no-exact: the float simulation (float matmuls of dequantized values) against the integer runtime. Where
    # the fake-quant model's top-2 margin is above float rounding the runtime nearly always picks the same token;
    # not always, since rounding that moves an activation across a code boundary shifts logits by ~1e-3.
    overall = runtime_main([*args, "--no-exact"])["overall"]
    assert overall["top1_decided"] >= 0.999 and overall["decided_fraction"] > 0.8
    assert overall["top1_all"] >= 0.97 and overall["max_rel_diff"] < 1e-2
    assert 0 <= overall["median_position_diff"] <= overall["max_abs_diff"]
    assert 0.0 <= overall["share_positions_above_1e-3"] <= 1.0 and overall["share_positions_identical"] < 1.0
    assert "float simulation" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--samples / --batch_size: must be >= 1"):
        runtime_main([str(out), "--samples", "0"])


def test_encodings_round_trip_and_strict_loading() -> None:
    loaded, plugin, batch = _quantized_model(QuantSpec(bits=4, granularity="group", group_size=8),
                                             QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                             QuantSpec(bits=8, granularity="token", mode="dynamic"))
    want = loaded.model(**batch).logits
    encodings = json.loads(json.dumps(export_encodings(loaded.model)))
    down = "model.language_model.layers.0.mlp.down_proj"
    assert len(encodings["param_encodings"][f"{down}.weight"]) == loaded.model.get_submodule(down).weight.numel() // 8
    fresh = load_vlm(str(FAMILY_SPECS["llava"])).model.eval()
    fresh.load_state_dict(loaded.model.state_dict(), strict=False)
    other = PostTrainingQuantization(weights=plugin.weights, activations=plugin.activations,
                                     targets=plugin.targets, activation_sites=plugin.activation_sites)
    other.transform(fresh)
    load_encodings(fresh, encodings)
    torch.testing.assert_close(fresh(**batch).logits, want, atol=0, rtol=0)
    assert not any(q.scale.requires_grad for q in quantizers_of(fresh).values() if q.scale is not None)

    def broken(edit):  # noqa: ANN001, ANN202
        copy = json.loads(json.dumps(encodings))
        edit(copy)
        return copy

    name = "model.language_model.layers.0.mlp.up_proj.weight"
    act = "model.language_model.layers.1.self_attn.o_proj.input"
    cases = [
        (broken(lambda e: e["param_encodings"].pop(name)), rf"no encoding for {name}.*no float fallback"),
        (broken(lambda e: e["activation_encodings"].pop(act)), rf"no encoding for {act}"),
        (broken(lambda e: e["param_encodings"].update({"model.extra.weight": e["param_encodings"][name]})),
         r"model.extra.weight has a param encoding but the model has no quantizer"),
        (broken(lambda e: e["param_encodings"][name].pop()), rf"{name} has \d+ entries but its quantizer needs"),
        (broken(lambda e: e["vlmc"]["layouts"][name].update({"shape": [3, 3]})), rf"{name} was made for shape"),
        (broken(lambda e: [i.update({"bitwidth": 8}) for i in e["param_encodings"][name]]),
         rf"{name} has bitwidth 8 but its quantizer has 4"),
    ]
    for bad, message in cases:
        target = load_vlm(str(FAMILY_SPECS["llava"])).model
        other.transform(target)
        with pytest.raises(ValueError, match=message):
            load_encodings(target, bad)
        assert not any(q.is_initialized for q in quantizers_of(target).values()), "nothing loads on an error"


# ---------------------------------------------------------------------------------------------- integer runtime
@pytest.mark.parametrize(
    ("weights", "kv", "shared_inputs"),
    [
        (QuantSpec(bits=8, granularity="channel"), None, None),
        (QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=8, granularity="token", mode="dynamic"), None),
        (QuantSpec(bits=4, granularity="group", group_size=16), QuantSpec(bits=8, granularity="tensor"), None),
        (QuantSpec(bits=4, granularity="channel", symmetric=False), None, None),
        (QuantSpec(bits=4, granularity="channel"), None, [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]),
    ],
    ids=["w8a8-channel", "w4a8-channel-kv-token", "w4a8-group16-kv-static", "w4a8-asym", "w4a8-shared-inputs"],
)
def test_integer_runtime_reproduces_fake_quant(tmp_path: Path, weights: QuantSpec, kv: QuantSpec | None,
                                               shared_inputs: list[list[str]] | None) -> None:
    loaded, plugin, batch = _quantized_model(weights, QuantSpec(bits=8, granularity="tensor", symmetric=False), kv,
                                             shared_inputs)
    model = loaded.model
    captured = {}

    def grab(module, args, kwargs):  # noqa: ANN001, ANN202
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        fake = model(**batch).logits
    handle.remove()
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    runtime = IntegerRuntime(out)
    logits = runtime(inputs_embeds=captured["embeds"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    # A randomly initialised model has near-ties between its top logits; agreement is exact wherever the top-2
    # margin of the fake-quant model exceeds the float rounding level, and near-exact overall.
    top2 = fake.topk(2, dim=-1).values
    decided = mask & (top2[..., 0] - top2[..., 1] > 1e-3)
    agreement = Top1Agreement()
    agreement.update(logits, fake, decided)
    assert float(agreement.compute()) == 1.0 and int(decided.sum()) >= 0.8 * int(mask.sum())
    overall = Top1Agreement()
    overall.update(logits, fake, mask)
    assert float(overall.compute()) >= 0.97
    # Integer accumulation differs from float32 summation by rounding only; where that moves an activation
    # across a code boundary the next layer sees one step more or less, so a few logits differ slightly.
    diff = (logits[mask] - fake[mask]).abs()
    assert float(diff.max()) <= 1e-2 * max(1.0, float(fake[mask].abs().max()))
    if kv is None or kv.mode == "static":
        # With a dynamic KV cache a flip in one key reaches every later query, so most logits move slightly.
        assert float((diff > 1e-5).float().mean()) < 0.25


# ---------------------------------------------------------------------------------------------- stacking
def test_stacks_with_sparsity_on_the_same_layers(tmp_path: Path) -> None:
    from plugins.sparsity import SparsityRamp

    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    targets = ModuleSelection(include="language_model", exclude="lm_head")
    sparsity = SparsityRamp(final_sparsity=0.75, targets=targets)
    qat = QuantizationAwareTraining(weights=QuantSpec(bits=4, granularity="channel"), targets=targets)
    sparsity.transform(loaded.model)
    qat.transform(loaded.model)
    sparsity.update_masks(0.75)
    qat.init_weight_quantizers(loaded.model)
    out = export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [sparsity, qat])
    report = json.loads((out / "qat_bpv.json").read_text())
    for row in report["layers"]:
        assert row["sparsity"] >= 0.75 and row["format"] == "bitmask", row["name"]
        assert row["bpv"] <= row["bitmask_bound"] <= 2.0 + 1e-9, row["name"]
    assert report["summary"]["bpv"] <= 2.0
    # The whole model: the packed layers at their storage bits, everything outside the selection at 16 bits.
    whole, parameters = report["model"], sum(p.numel() for p in load_vlm(str(out)).model.parameters())
    assert whole["parameters"] == parameters and whole["packed_parameters"] == report["summary"]["numel"]
    rest = parameters - report["summary"]["numel"]
    assert whole["bits_per_weight"] == pytest.approx((report["summary"]["storage_bits"] + 16 * rest) / parameters)
    assert report["summary"]["bpv"] < whole["bits_per_weight"] < 16


def test_stacked_fit_with_sparsity(tmp_path: Path) -> None:
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.5, "start_step": 0, "end_step": 2}}
    cli = make_cli(tiny_config(tmp_path, max_steps=3, callbacks=[ramp, _qat({"bits": 4})], **NO_VAL))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    from plugins.sparsity.layer import weight_mask_of

    masked = {n: m for n, m in cli.model.model.named_modules() if weight_mask_of(m) is not None}
    assert masked and all(n + ".weight" in quantizers_of(cli.model.model) for n in masked)
    for layer in masked.values():
        pruned = ~weight_mask_of(layer).bool()
        assert pruned.float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert torch.all(layer.weight[pruned] == 0)  # the masks survive fake-quant training


def test_fake_quant_bench_runs_and_composite_matches(tmp_path: Path) -> None:
    from plugins.quantization.bench import main as bench_main

    result = bench_main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--tokens", "32",
                         "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "fq.json")])
    assert len(result["rows"]) == 6
    assert all(row[f"{way}_ms"] > 0 for row in result["rows"] for way in ("ours", "torch_fused", "composite"))
    assert json.loads((tmp_path / "fq.json").read_text())["rows"][0]["quantizer"].startswith("weight W4")
    # The composite baseline computes the same function and LSQ gradients as the fused kernels.
    from plugins.quantization.bench import composite_lsq

    torch.manual_seed(0)
    w = torch.randn(16, 32)
    quantizer = FakeQuantizer(QuantSpec(bits=4, granularity="channel"), shape=w.shape)
    quantizer.calibrate(w * 0.7)
    quantizer.scale.requires_grad_(True)
    x = w.clone().requires_grad_(True)
    quantizer(x).sum().backward()
    fused = (x.grad.clone(), quantizer.scale.grad.clone())
    x.grad, quantizer.scale.grad = None, None
    scale, zero_point = quantizer.qparams(x)
    out = composite_lsq(x, scale, zero_point, *quantizer.quant_range, 1.0 / (32 * 7) ** 0.5)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), quantizer(w).detach())
    torch.testing.assert_close(x.grad, fused[0])
    torch.testing.assert_close(quantizer.scale.grad, fused[1], rtol=1e-4, atol=1e-6)


def test_initialized_flag_follows_calibration_and_loaded_state() -> None:
    """`is_initialized` is read from a host copy (no device sync per forward) that tracks the checkpointed buffer."""
    w = torch.randn(8, 16)
    fresh = FakeQuantizer(QuantSpec(bits=4, granularity="channel"), shape=w.shape)
    calibrated = FakeQuantizer(QuantSpec(bits=4, granularity="channel"), shape=w.shape)
    assert not calibrated.is_initialized  # read once from the buffer
    calibrated.calibrate(w)
    assert calibrated.is_initialized and bool(calibrated.initialized)
    calibrated.initialized.fill_(False)  # behind the host copy's back: the flag is not read again
    assert calibrated.is_initialized
    calibrated.initialized.fill_(True)
    fresh.load_state_dict(calibrated.state_dict())  # a checkpoint of a calibrated quantizer
    assert fresh.is_initialized
    torch.testing.assert_close(fresh(w), calibrated(w), atol=0, rtol=0)
    calibrated.load_state_dict(FakeQuantizer(QuantSpec(bits=4, granularity="channel"), shape=w.shape).state_dict())
    assert not calibrated.is_initialized  # an uncalibrated state loaded over it
    with pytest.raises(RuntimeError, match="used before calibration"):
        calibrated(w)


# ---------------------------------------------------------------------------------------------- token embeddings
EMBEDDINGS_AND_LINEARS = {"include": "language_model", "types": ["Linear", "Embedding"]}


def test_embedding_table_is_quantized_per_row_and_looked_up_on_the_grid() -> None:
    from plugins.quantization.placement import QuantEmbedding, remove_quantizers

    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model
    plugin = PostTrainingQuantization(weights=QuantSpec(bits=4, granularity="channel"),
                                      activations=QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                      targets=ModuleSelection(**EMBEDDINGS_AND_LINEARS))
    plugin.transform(model)
    embed = model.model.language_model.embed_tokens
    assert type(embed) is QuantEmbedding and "model.language_model.embed_tokens.weight" in plugin.quantizers
    # Token ids are not an activation: the embedding gets no input quantizer.
    assert "model.language_model.embed_tokens.input" not in plugin.quantizers
    plugin.init_weight_quantizers(model)
    quantizer = plugin.quantizers["model.language_model.embed_tokens.weight"]
    quantizer.enabled = True
    assert quantizer.scale.numel() == embed.num_embeddings  # one scale per token row
    ids = torch.tensor([[0, 5, 17, 2047]])
    scale, zero_point = quantizer.qparams(embed.weight)
    codes = quantizer.codes(embed.weight.detach())
    assert codes.min() >= -8 and codes.max() <= 7
    torch.testing.assert_close(embed(ids)[0], ((codes - zero_point) * scale)[ids[0]].float(), atol=0, rtol=0)
    with quantization_disabled(model):
        torch.testing.assert_close(embed(ids), torch.nn.functional.embedding(ids, embed.weight), atol=0, rtol=0)
    remove_quantizers(model)
    assert type(embed) is nn.Embedding
    torch.testing.assert_close(embed.weight[ids[0]], ((codes - zero_point) * scale)[ids[0]].float(), atol=0, rtol=0)


def test_tied_tables_share_one_quantizer_or_are_refused(tmp_path: Path) -> None:
    from plugins.quantization import attach_from_encodings

    tied_spec = str(ROOT_DIR / "experiments" / "models" / "llava-tiny.json")  # tie_word_embeddings, like SmolLM2
    loaded = load_vlm(tied_spec)
    model = loaded.model.eval()
    table = model.model.language_model.embed_tokens
    assert model.lm_head.weight is table.weight
    with pytest.raises(ValueError, match=r"embed_tokens.weight is the same tensor as lm_head.weight \(tied"):
        attach_quantizers(model, QuantSpec(bits=4), targets=ModuleSelection(include="embed_tokens",
                                                                            types=["Embedding"]), key="qat")
    assert not quantizers_of(model), "nothing attached on an error"
    plugin = PostTrainingQuantization(weights=QuantSpec(bits=4, granularity="channel"),
                                      activations=QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                      targets=ModuleSelection(include="language_model|lm_head",
                                                              types=["Linear", "Embedding"]), integer_eval=True)
    plugin.transform(model)
    quantizers = quantizers_of(model)
    assert quantizers["lm_head.weight"] is quantizers["model.language_model.embed_tokens.weight"]
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to .*embed_tokens.weight, quantized with .*bits=4.*"
                                         r"one tensor takes one spec"):
        attach_quantizers(model, QuantSpec(bits=8), targets=ModuleSelection(include="lm_head"), key="second")
    plugin.init_weight_quantizers(model)
    for q in plugin.quantizers.values():
        q.enabled, q.observing = not q.static or q.is_initialized, q.static and not q.is_initialized
    batch = _batch(loaded)
    model(**batch)
    freeze_observers([q for q in plugin.quantizers.values() if q.observing])
    for q in plugin.quantizers.values():
        q.enabled, q.observing = True, False
    ids = batch["input_ids"][:, :12]
    with torch.no_grad():
        fake = model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state)
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    # One table in the export: its codes once, the head's entry names it as shared; the whole-model count holds.
    codes = load_unpacked(out / "ptq_int_weights.safetensors")
    assert "model.language_model.embed_tokens.weight" in codes and "lm_head.weight" not in codes
    encodings = json.loads((out / "ptq.encodings").read_text())
    assert encodings["vlmc"]["shared_activations"]["lm_head.weight"] == "model.language_model.embed_tokens.weight"
    report = json.loads((out / "ptq_bpv.json").read_text())
    exported = load_vlm(str(out)).model
    assert report["model"]["parameters"] == sum(p.numel() for p in exported.parameters())
    assert exported.lm_head.weight is exported.get_input_embeddings().weight
    torch.testing.assert_close(IntegerRuntime(out)(input_ids=ids), fake, atol=0, rtol=0)
    # Loaded back as a frozen base: the two modules get one quantizer again, and the same lookups.
    attach_from_encodings(exported.eval(), out / "ptq.encodings")
    shared = quantizers_of(exported)
    assert shared["lm_head.weight"] is shared["model.language_model.embed_tokens.weight"]
    torch.testing.assert_close(exported.get_input_embeddings()(ids), table(ids), atol=0, rtol=0)


def test_embedding_group_size_must_divide_the_table_width() -> None:
    with pytest.raises(ValueError, match=r"qat.weights.group_size: 24 does not divide the 32 inputs of .*embed_tokens"):
        attach_quantizers(load_vlm(str(FAMILY_SPECS["llava"])).model,
                          QuantSpec(bits=4, granularity="group", group_size=24),
                          targets=ModuleSelection(include="embed_tokens", types=["Embedding"]), key="qat")


def test_integer_runtime_looks_up_the_quantized_table(tmp_path: Path) -> None:
    loaded, plugin, batch = _quantized_model(QuantSpec(bits=4, granularity="group", group_size=16),
                                             QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                             targets=ModuleSelection(**EMBEDDINGS_AND_LINEARS), integer_eval=True)
    model = loaded.model
    ids = batch["input_ids"][:, :12]  # text only: the runtime embeds the ids itself
    with torch.no_grad():
        embedded = model.get_input_embeddings()(ids)
        fake = model.model.language_model(input_ids=ids).last_hidden_state
        fake = model.lm_head(fake)
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    runtime = IntegerRuntime(out)
    torch.testing.assert_close(runtime.embed(ids), embedded, atol=0, rtol=0)
    torch.testing.assert_close(runtime(input_ids=ids), fake, atol=0, rtol=0)  # integer-exact: bit for bit
    encodings = json.loads((out / "ptq.encodings").read_text())
    entries = encodings["param_encodings"]["model.language_model.embed_tokens.weight"]
    assert len(entries) == 2048 * 32 // 16 and encodings["vlmc"]["layouts"][
        "model.language_model.embed_tokens.weight"]["shape"] == [2048, 32]
    # The table is packed, so it counts at its storage bits in the whole-model figure.
    report = json.loads((out / "ptq_bpv.json").read_text())
    table = next(r for r in report["layers"] if r["name"] == "model.language_model.embed_tokens.weight")
    assert table["numel"] == 2048 * 32 and table["bpv"] <= 4.0
    assert report["model"]["packed_parameters"] == report["summary"]["numel"] >= 2048 * 32
    # The export as a frozen quantized base (QALFT's): quantizers placed from the encodings file alone, the
    # table's among them, reproduce the lookup.
    from plugins.quantization import attach_from_encodings
    from plugins.quantization.placement import QuantEmbedding

    fresh = load_vlm(str(out)).model.eval()
    placed = attach_from_encodings(fresh, out / "ptq.encodings")
    assert type(fresh.get_input_embeddings()) is QuantEmbedding
    assert "model.language_model.embed_tokens.weight" in placed
    torch.testing.assert_close(fresh.get_input_embeddings()(ids), embedded, atol=0, rtol=0)


def test_whole_model_stack_packs_every_table_and_layer(tmp_path: Path) -> None:
    """75% sparse + 4-bit over every Linear and the token table (vision tower, projector and head too): the whole-
    model figure then leaves only norms, biases, the patch convolution and position embeddings at 16 bits."""
    from plugins.sparsity.layer import weight_mask_of

    whole = {"include": ".*", "exclude": "position_embedding", "types": ["Linear", "Embedding"]}
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.75, "start_step": 0, "end_step": 2, "targets": whole}}
    qat = _qat({"bits": 4, "granularity": "channel"}, {"bits": 8, "granularity": "tensor", "symmetric": False},
               targets=whole, calibration_batches=1)
    config = tiny_config(tmp_path, max_steps=3, callbacks=[ramp, qat], **NO_VAL)
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model.model
    embed = model.get_input_embeddings()
    assert float((~weight_mask_of(embed)).float().mean()) == pytest.approx(0.75, abs=1e-3)
    assert (embed.weight[~weight_mask_of(embed)] == 0).all()
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    report = json.loads((tmp_path / "export" / "qat_bpv.json").read_text())
    names = {row["name"] for row in report["layers"]}
    assert {"model.language_model.embed_tokens.weight", "lm_head.weight"} <= names
    assert any("vision_tower" in n for n in names) and any("multi_modal_projector" in n for n in names)
    for row in report["layers"]:
        assert row["sparsity"] >= 0.75 and row["bpv"] <= 2.0 + 1e-9, row["name"]
    exported = load_vlm(str(tmp_path / "export")).model
    packed = sum(m.weight.numel() for n, m in exported.named_modules()
                 if isinstance(m, (nn.Linear, nn.Embedding)) and "position_embedding" not in n)
    figure = report["model"]
    assert figure["packed_parameters"] == packed
    assert figure["parameters"] == sum(p.numel() for p in exported.parameters())
    assert figure["bits_per_weight"] == pytest.approx(
        (report["summary"]["storage_bits"] + 16 * (figure["parameters"] - packed)) / figure["parameters"])


# ---------------------------------------------------------------------------------------------- convolutions
WITH_PATCHES = {"include": ".*", "exclude": "position_embedding", "types": ["Linear", "Embedding", "Conv2d"]}


def test_patch_convolution_is_quantized_per_channel_packed_and_loaded_back(tmp_path: Path) -> None:
    """The vision tower's patch embedding on the 4-bit grid, one scale per output channel: exported with its codes
    and encoding, counted among the packed tensors of the whole-model figure, and placed again from the encodings."""
    from plugins.quantization import attach_from_encodings
    from plugins.quantization.placement import QuantConv2d

    loaded, plugin, batch = _quantized_model(QuantSpec(bits=4, granularity="channel"),
                                             QuantSpec(bits=8, granularity="tensor", symmetric=False),
                                             targets=ModuleSelection(**WITH_PATCHES))
    model = loaded.model
    conv = model.model.vision_tower.embeddings.patch_embedding
    name = "model.vision_tower.embeddings.patch_embedding.weight"
    assert type(conv) is QuantConv2d and name in plugin.quantizers
    quantizer = plugin.quantizers[name]
    assert quantizer.scale.numel() == conv.out_channels
    codes = quantizer.codes(conv.weight.detach())
    scale, zero_point = quantizer.qparams(conv.weight)
    assert codes.min() >= -8 and codes.max() <= 7 and codes.shape == conv.weight.shape
    pixels = batch["pixel_values"]
    kernel = ((codes.reshape(conv.out_channels, -1) - zero_point) * scale).reshape(conv.weight.shape)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(plugin.quantizers[name.replace(".weight", ".input")](pixels),
                                              kernel.float(), conv.bias, conv.stride)
        torch.testing.assert_close(conv(pixels), expected, atol=0, rtol=0)
        logits = model(**batch).logits
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    encodings = json.loads((out / "ptq.encodings").read_text())
    assert len(encodings["param_encodings"][name]) == conv.out_channels
    assert encodings["vlmc"]["layouts"][name]["shape"] == list(conv.weight.shape)
    assert torch.equal(load_unpacked(out / "ptq_int_weights.safetensors")[name].long(), codes)
    report = json.loads((out / "ptq_bpv.json").read_text())
    row = next(r for r in report["layers"] if r["name"] == name)
    assert row["numel"] == conv.weight.numel() and row["bpv"] <= 4.0 + 64 / conv.weight[0].numel()
    exported = load_vlm(str(out)).model.eval()
    assert report["model"]["packed_parameters"] == sum(
        m.weight.numel() for n, m in exported.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)) and "position_embedding" not in n)
    # The export as a frozen quantized base: the kernel's quantizer comes back from the encodings alone, and the
    # whole model computes what the fake-quantized one did.
    placed = attach_from_encodings(exported, out / "ptq.encodings")
    assert name in placed and type(exported.model.vision_tower.embeddings.patch_embedding) is QuantConv2d
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, logits)
    IntegerRuntime(out)  # loads the 4-D kernel's codes as the matrix of unfolded patches


def test_convolution_takes_tensor_or_channel_scales_only() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    with pytest.raises(ValueError, match=r"qat.weights.granularity: group on .*patch_embedding, a Conv2d; a "
                                         r"convolution's kernel is quantized per tensor or per output channel"):
        attach_quantizers(model, QuantSpec(bits=4, granularity="group", group_size=16),
                          targets=ModuleSelection(include="patch_embedding", types=["Conv2d"]), key="qat")
    with pytest.raises(ValueError, match=r"qat.targets: .*embeddings is a CLIPVisionEmbeddings; weights are quantized "
                                         r"on Linear, Embedding, Conv2d and Conv3d layers"):
        attach_quantizers(model, QuantSpec(bits=4), targets=ModuleSelection(include=r"vision_tower\.embeddings$",
                                                                            types=["CLIPVisionEmbeddings"]), key="qat")


def test_qwen2_vl_patch_convolution_is_a_quantized_conv3d() -> None:
    import math

    from plugins.quantization.placement import QuantConv3d, remove_quantizers

    model = load_vlm(str(FAMILY_SPECS["qwen2_vl"])).model
    quantizers = attach_quantizers(model, QuantSpec(bits=4, granularity="channel"),
                                   targets=ModuleSelection(include="patch_embed", types=["Conv3d"]), key="qat")
    ((name, quantizer),) = quantizers.items()
    conv = model.get_submodule(name.removesuffix(".weight"))
    assert type(conv) is QuantConv3d
    quantizer.calibrate(conv.weight)
    patches = torch.randn(4, conv.in_channels * math.prod(conv.kernel_size))
    with torch.no_grad():
        quantized = conv(patches.reshape(-1, conv.in_channels, *conv.kernel_size))
        remove_quantizers(model)  # baked: the plain Conv3d computes the same with the grid's kernel
        assert type(conv) is nn.Conv3d
        torch.testing.assert_close(conv(patches.reshape(-1, conv.in_channels, *conv.kernel_size)), quantized,
                                   atol=0, rtol=0)


def test_qat_fit_learns_the_patch_convolution_on_its_grid_beside_a_pruned_text_tower(tmp_path: Path) -> None:
    """The stack whose vision tower stays dense: the text tower 75% sparse, every Linear, the token table and the
    patch convolution 4-bit under QAT; the kernel's scale learns, the export packs it."""
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.75, "start_step": 0, "end_step": 2,
                          "targets": {"include": "language_model", "exclude": "lm_head"}}}
    qat = _qat({"bits": 4, "granularity": "channel"}, {"bits": 8, "granularity": "tensor", "symmetric": False},
               targets=WITH_PATCHES, calibration_batches=1)
    config = tiny_config(tmp_path, max_steps=3, callbacks=[ramp, qat], **NO_VAL)
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    conv = cli.model.model.model.vision_tower.embeddings.patch_embedding
    quantizer = conv.weight_quantizer
    assert quantizer.is_initialized and quantizer.scale.shape == (conv.out_channels, 1, 1, 1)
    assert quantizer.scale.requires_grad and quantizer.scale.grad is not None, "LSQ learns the kernel's scales"
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    report = json.loads((tmp_path / "export" / "qat_bpv.json").read_text())
    name = "model.vision_tower.embeddings.patch_embedding.weight"
    row = next(r for r in report["layers"] if r["name"] == name)
    assert row["numel"] == conv.weight.numel()
    exported = load_vlm(str(tmp_path / "export")).model
    kernel = exported.model.vision_tower.embeddings.patch_embedding.weight
    codes = load_unpacked(tmp_path / "export" / "qat_int_weights.safetensors")[name].long()
    scale, zero_point = quantizer.qparams(conv.weight)
    rows = (codes.reshape(conv.out_channels, -1) - zero_point) * scale.detach()
    torch.testing.assert_close(kernel, rows.reshape(kernel.shape).float(), atol=0, rtol=0)
