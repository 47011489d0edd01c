"""Integer-exact evaluation: the fake-quant model and IntegerRuntime agree bit for bit on an export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_quantization import _quantized_model

from framework.export import export_model
from framework.metrics import Top1Agreement
from plugins.quantization import IntegerRuntime, QuantSpec, attach_quantizers
from plugins.quantization.placement import QuantLinear, integer_exact_eval, set_integer_exact
from plugins.quantization.quantizer import IntegerRows, integer_linear

A8_STATIC = QuantSpec(bits=8, granularity="tensor", symmetric=False)
A8_TOKEN = QuantSpec(bits=8, granularity="token", mode="dynamic")
A8_GROUP = QuantSpec(bits=8, granularity="group", group_size=16, mode="dynamic")
W8_CHANNEL = QuantSpec(bits=8, granularity="channel")
W4_CHANNEL = QuantSpec(bits=4, granularity="channel")
W4_GROUP = QuantSpec(bits=4, granularity="group", group_size=16)
W4_ASYM = QuantSpec(bits=4, granularity="channel", symmetric=False)

CASES = [
    (W8_CHANNEL, A8_STATIC, None),
    (W8_CHANNEL, A8_TOKEN, A8_TOKEN),
    (W4_CHANNEL, A8_STATIC, A8_TOKEN),
    (W4_GROUP, A8_STATIC, QuantSpec(bits=8, granularity="tensor")),
    (W4_GROUP, A8_TOKEN, A8_TOKEN),
    (QuantSpec(bits=8, granularity="group", group_size=8), A8_GROUP, None),
    (W4_ASYM, A8_STATIC, A8_STATIC),
    (W4_CHANNEL, None, A8_TOKEN),
]
IDS = ["w8a8-channel-static", "w8a8-channel-token-kv-token", "w4a8-channel-static-kv-token",
       "w4a8-group16-static-kv-static", "w4a8-group16-token-kv-token", "w8a8-group8-act-group16",
       "w4a8-asym-kv-static", "w4-weight-only-kv-token"]


def _embeds_and_logits(model: nn.Module, batch: dict, *, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}

    def grab(module, args, kwargs):  # noqa: ANN001, ANN202
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            if exact:
                with integer_exact_eval(model):
                    logits = model(**batch).logits
            else:
                logits = model(**batch).logits
    finally:
        handle.remove()
    return captured["embeds"], logits


@pytest.mark.parametrize(("weights", "activations", "kv"), CASES, ids=IDS)
def test_integer_exact_fake_quant_equals_integer_runtime(tmp_path: Path, weights: QuantSpec,
                                                         activations: QuantSpec | None, kv: QuantSpec | None) -> None:
    loaded, plugin, batch = _quantized_model(weights, activations, kv)
    model = loaded.model
    assert not batch["attention_mask"].bool().all(), "the batch pads one row: the runtime's boolean-mask path"
    row = int(batch["attention_mask"].sum(dim=1).argmax())
    single = {k: v[row:row + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
    assert single["attention_mask"].bool().all(), "one unpadded row: the runtime's is_causal / grouped-heads path"
    runs = [(b, *_embeds_and_logits(model, b, exact=True)) for b in (batch, single)]
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    runtime = IntegerRuntime(out)
    for inputs, embeds, exact in runs:
        logits = runtime(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        mask = inputs["attention_mask"].bool()
        agreement = Top1Agreement()
        agreement.update(logits, exact, mask)
        assert float(agreement.compute()) == 1.0
        # Same integers, same float32 ops in the same order: equal bits, padded rows included.
        assert torch.equal(logits, exact)


@pytest.mark.parametrize(("weights", "activations"), [(W8_CHANNEL, A8_STATIC), (W4_GROUP, A8_TOKEN),
                                                      (W4_ASYM, A8_GROUP), (W4_CHANNEL, None)],
                         ids=["w8a8-channel-static", "w4a8-group-token", "w4a8-asym-act-group", "w4-weight-only"])
def test_integer_exact_layer_is_the_float_path_up_to_rounding(weights: QuantSpec, activations: QuantSpec | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    layer = model[0]
    found = attach_quantizers(model, weights, activations, key="test")
    x = torch.randn(3, 5, 64) * 2
    for quantizer in found.values():
        if quantizer.static:
            quantizer.calibrate(layer.weight.detach() if quantizer.shape else x)
    assert isinstance(layer, QuantLinear) and not layer.integer_exact
    layer.eval()
    with torch.no_grad():
        float_path = layer(x)
        with integer_exact_eval(layer):
            exact = layer(x)
        assert not layer.integer_exact, "the context restores the flag"
        # Dequantized operands are exact products (q - zero_point) * scale rounded once; a float32 dot product of n
        # terms errs by at most n * 2**-24 * sum |x_i w_i|, the final rounding and the bias add by 2**-24 each.
        x_hat = found["0.input"](x) if activations is not None else x
        w_hat = found["0.weight"](layer.weight)
        magnitude = x_hat.abs().double() @ w_hat.abs().double().t() + layer.bias.abs().double()
        bound = (64 + 4) * 2.0 ** -24 * magnitude
        assert bool(((exact.double() - float_path.double()).abs() <= bound).all())
        if activations is None:  # weight-only: a float matmul on device too
            assert torch.equal(exact, float_path)
        else:
            assert not torch.equal(exact, float_path), "the integer path runs (its rounding differs somewhere)"
    layer.train()
    with integer_exact_eval(layer):  # training keeps the float path and its gradients
        assert torch.equal(layer(x), float_path)
    with pytest.raises(TypeError, match="integer_exact: must be true or false"):
        set_integer_exact(layer, 1)  # type: ignore[arg-type]
    assert set_integer_exact(layer, True) == 1 and layer.integer_exact


def test_integer_exact_model_is_the_fake_quant_model_up_to_rounding() -> None:
    loaded, _, batch = _quantized_model(W4_CHANNEL, A8_STATIC, A8_TOKEN)
    _, fake = _embeds_and_logits(loaded.model, batch, exact=False)
    _, exact = _embeds_and_logits(loaded.model, batch, exact=True)
    mask = batch["attention_mask"].bool()
    # Per layer the two differ by float rounding; where that moves an activation across a code boundary the next
    # layer sees one step more or less, so a few logits move by about one activation step and near-ties can flip.
    diff = (exact[mask] - fake[mask]).abs()
    assert float(diff.max()) <= 1e-2 * float(fake[mask].abs().max())
    agreement = Top1Agreement()
    agreement.update(exact, fake, mask)
    assert float(agreement.compute()) >= 0.97


def test_integer_linear_accumulates_exactly_per_block() -> None:
    torch.manual_seed(0)
    x = torch.randint(-128, 128, (5, 32))
    w = torch.randint(-8, 8, (6, 32))
    sx, sw = torch.rand(5, 4).double() + 0.5, torch.rand(6, 2).double() + 0.5
    got = integer_linear(IntegerRows(x, sx, 8), IntegerRows(w, sw, 16))
    want = sum((x[:, k * 8:(k + 1) * 8] @ w[:, k * 8:(k + 1) * 8].t()).double() * sx[:, k:k + 1] * sw[:, k // 2]
               for k in range(4))
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    # Past float64's exact integer range the accumulation is int64.
    big = IntegerRows(torch.full((1, 4), 1 << 25), torch.ones(1, 1, dtype=torch.float64), 4)
    assert float(integer_linear(big, big)) == float(4 * (1 << 50))
