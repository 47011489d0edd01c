"""QALFT: LoRA on a frozen quantized base (PEFT), distillation from the float teacher, 1+N LoRA export."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import FAMILY_SPECS
from helpers import TINY_DATA, StopAt, fit_straight_and_resumed, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.export import export_model
from framework.models import load_vlm
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from plugins.quantization import (
    QALFT,
    ActivationSite,
    PostTrainingQuantization,
    QuantSpec,
    adapters_disabled,
    check_base_matches,
    load_quantized_base,
    quantization_disabled,
    quantizers_of,
    set_adapter,
)
from plugins.quantization.adapters import lora_layers

QALFT_PATH = "plugins.quantization.QALFT"
NO_VAL = {"limit_val_batches": 0}
KV = ModuleSelection(include=r"language_model.*(k_proj|v_proj)$")


def _batch(loaded):  # noqa: ANN001, ANN202
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    return processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[1]])


@pytest.fixture(scope="module")
def base_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A W4A8 PTQ base (4-bit per-channel weights, 8-bit static inputs, static 8-bit KV cache) exported once."""
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model.eval()
    torch.manual_seed(0)
    ptq = PostTrainingQuantization(
        weights=QuantSpec(bits=4), activations=QuantSpec(bits=8, granularity="tensor", symmetric=False),
        targets=ModuleSelection(include="language_model", exclude="lm_head"),
        activation_sites=[ActivationSite(KV, ["output"], QuantSpec(bits=8, granularity="tensor", symmetric=False))])
    ptq.transform(model)
    ptq.init_weight_quantizers(model)
    pending = list(ptq.static_quantizers("activation").values())
    for q in ptq.quantizers.values():
        q.enabled, q.observing = not q.static or q.is_initialized, q in pending
    with torch.no_grad():
        model(**_batch(loaded))
    for q in pending:
        q.freeze_observer()
    return export_model(model, loaded.tokenizer, loaded.image_processor,
                        tmp_path_factory.mktemp("qalft") / "base", [ptq])


def _qalft(encodings: Path | None, **kwargs) -> dict:  # noqa: ANN003
    args = {"encodings": None if encodings is None else str(encodings), **kwargs}
    if encodings is None:
        args.setdefault("base", "float")
    return {"class_path": QALFT_PATH, "init_args": args}


def _plugin(cli) -> QALFT:  # noqa: ANN001
    return next(c for c in cli.trainer.callbacks if isinstance(c, QALFT))


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"base": "gptq"}, ValueError, r"QALFT.base: must be one of 'encodings', 'float', 'bnb_nf4', 'bnb_int8'"),
        ({}, ValueError, r"QALFT.encodings: base 'encodings' needs the .encodings file"),
        ({"encodings": "nowhere/qat.encodings"}, FileNotFoundError,
         r"QALFT.encodings: encodings file nowhere/qat.encodings does not exist"),
        ({"base": "float", "encodings": "x.encodings"}, ValueError, r"QALFT.encodings: only used with base: encodings"),
        ({"base": "float", "r": 0}, ValueError, r"QALFT.r: the LoRA rank must be an integer >= 1"),
        ({"base": "float", "alpha": -1.0}, ValueError, r"QALFT.alpha: must be a positive number"),
        ({"base": "float", "dropout": 1.0}, ValueError, r"QALFT.dropout: must be in \[0, 1\)"),
        ({"base": "float", "mode": "rlhf"}, ValueError, r"QALFT.mode: must be one of 'sft', 'distill'"),
        ({"base": "float", "adapter_name": "a/b"}, ValueError, r"QALFT.adapter_name: must be letters, digits"),
        ({"base": "float", "temperature": 0.0}, ValueError, r"QALFT.temperature: must be a positive number"),
        ({"base": "float", "sft_weight": 0.0}, ValueError, r"QALFT.sft_weight: mode 'sft' with sft_weight 0"),
        ({"base": "bnb_nf4", "mode": "distill"}, ValueError, r"QALFT.mode: 'distill' needs the float teacher"),
        ({"base": "float", "feature_weight": 1.0}, ValueError, r"QALFT.feature_weight: .* needs mode: distill"),
        ({"base": "float", "mode": "distill", "feature_weight": -1.0}, ValueError,
         r"QALFT.feature_weight: must be a number >= 0"),
        ({"base": "float", "mode": "distill", "feature_weight": 1.0, "feature_layers": [2, 2]}, ValueError,
         r"QALFT.feature_layers: must be distinct hidden-state indices"),
    ],
)
def test_misconfiguration_fails_in_init(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        QALFT(**kwargs)


def test_model_dependent_checks_fail_in_transform(base_export: Path, tmp_path: Path) -> None:
    encodings = json.loads((base_export / "ptq.encodings").read_text())
    with pytest.raises(ValueError, match=r"qalft.targets: include='nothing' .* matched no module"):
        QALFT(encodings=str(base_export / "ptq.encodings"),
              targets=ModuleSelection(include="nothing")).transform(load_vlm(str(base_export)).model)
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    cases = [
        (lambda e: e["param_encodings"].pop(name), rf"no encoding for {name}.*no float fallback"),
        (lambda e: e["vlmc"]["layouts"][name].update({"shape": [3, 3]}), rf"{name} was made for shape"),
        (lambda e: e["param_encodings"].update({"model.vision.fc.weight": e["param_encodings"][name]}),
         r"model.vision.fc.weight names module 'model.vision.fc', which the model does not have"),
        (lambda e: e["param_encodings"][name].pop(), rf"{name} has \d+ entries but its quantizer needs"),
    ]
    for index, (edit, message) in enumerate(cases):
        broken = json.loads(json.dumps(encodings))
        edit(broken)
        path = tmp_path / f"broken{index}.encodings"
        path.write_text(json.dumps(broken))
        model = load_vlm(str(base_export)).model
        with pytest.raises(ValueError, match=message):
            QALFT(encodings=str(path)).transform(model)
        assert not any(q.is_initialized for q in quantizers_of(model).values()), "nothing loads on an error"


def test_bitsandbytes_base(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"qalft.base: 'bnb_nf4' needs bitsandbytes"):
            QALFT(base="bnb_nf4").transform(loaded.model)
        return
    QALFT(base="bnb_nf4").transform(loaded.model)
    loaded.model(**_batch(loaded)).logits.sum().backward()
    assert all(p.grad is None for n, p in loaded.model.named_parameters() if ".lora_" not in n)


def _bnb_spec(tmp_path: Path) -> Path:
    """llava-test with a 64-wide text tower: bitsandbytes' CPU kernels need layer widths in multiples of 64."""
    spec = json.loads((Path(FAMILY_SPECS["llava"])).read_text())
    spec["hf_config"]["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                            num_key_value_heads=2)
    path = tmp_path / "llava-bnb.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("kind", ["bnb_nf4", "bnb_int8"])
def test_bitsandbytes_base_fit_and_export(kind: str, tmp_path: Path) -> None:
    """QLoRA-style: the text tower's Linears become bitsandbytes layers (on the CPU where bitsandbytes runs there),
    only the adapters train, and the export (dequantized base + adapter) gives the trained model's outputs."""
    bnb = pytest.importorskip("bitsandbytes")
    spec = _bnb_spec(tmp_path)
    cli = make_cli(tiny_config(tmp_path, spec=str(spec), max_steps=3, callbacks=[_qalft(None, base=kind, r=4,
                                                                                          alpha=8.0)], **NO_VAL),
                   "--model.init_args.lr=0.03")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    model = cli.model.model
    layer_type = bnb.nn.Linear4bit if kind == "bnb_nf4" else bnb.nn.Linear8bitLt
    base_layers = [m for m in model.modules() if isinstance(m, layer_type)]
    assert len(base_layers) == 2 * 7  # every Linear of both decoder layers
    assert all(not p.requires_grad for m in base_layers for p in m.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert any(float(p.abs().max()) > 0 for p in lora_b), "LoRA B starts at zero: the adapters trained"
    batch = _batch(load_vlm(str(spec)))
    trained = _logits(model, batch)
    main(["export", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export"), "--model.init_args.lr=0.03"])
    exported = load_quantized_base(tmp_path / "export", encodings=None)
    assert not any(isinstance(m, layer_type) for m in exported.model.modules())  # a plain float base on disk
    # The base's weights are the dequantized bitsandbytes ones; bitsandbytes' own CPU matmul differs by rounding
    # (int8 casts inputs to float16).
    reloaded = _logits(exported.model, batch)
    torch.testing.assert_close(reloaded, trained, atol=0.05 if kind == "bnb_int8" else 2e-3, rtol=0)
    assert (reloaded.argmax(-1) == trained.argmax(-1)).float().mean() > 0.99


def test_bitsandbytes_base_resumes(tmp_path: Path) -> None:
    """A checkpoint holds the NF4 layers' quantization state; resuming checks it against the base quantized at
    start-up and ends where the uninterrupted run ends."""
    pytest.importorskip("bitsandbytes")
    spec = _bnb_spec(tmp_path)
    callbacks = [_qalft(None, base="bnb_nf4", r=4, alpha=8.0)]
    finished = fit_straight_and_resumed(
        tmp_path, lambda folder: tiny_config(folder, spec=str(spec), max_steps=8, callbacks=callbacks, **NO_VAL),
        "--model.init_args.lr=0.03")
    runs = {name: {k: v for k, v in model_state(cli.model).items() if ".lora_" in k} for name, cli in finished.items()}
    assert runs["straight"] and runs["straight"].keys() == runs["resumed"].keys()
    for key, value in runs["straight"].items():
        torch.testing.assert_close(runs["resumed"][key], value, rtol=0, atol=1e-6, msg=key)
    # A checkpoint of another base is refused, naming the layer.
    other = make_cli(tiny_config(tmp_path / "straight", spec=str(spec), max_steps=8, callbacks=callbacks,
                                 name="other.yaml", **NO_VAL), "--seed_everything=1")
    with pytest.raises(ValueError, match=r"q_proj.*bitsandbytes NF4 state .* another base"):
        other.trainer.fit(other.model, datamodule=other.datamodule,
                          ckpt_path=str(tmp_path / "straight" / "ckpt" / "epoch=0-step=4.ckpt"))


# ---------------------------------------------------------------------------------------------- layers
def test_kv_cache_quantized_after_the_lora_sum(base_export: Path) -> None:
    loaded = load_vlm(str(base_export))
    model = loaded.model.eval()
    plugin = QALFT(encodings=str(base_export / "ptq.encodings"))
    names = set(model.state_dict())
    plugin.transform(model)
    plugin.transform(model)  # idempotent
    state = model.state_dict()
    # Quantized tensors keep the names of the encodings file; base weights move under PEFT's base_layer.
    quantizers = quantizers_of(model)
    assert "model.language_model.layers.0.self_attn.k_proj.output" in quantizers
    assert "model.language_model.layers.0.self_attn.k_proj.input" in quantizers
    assert {n.replace(".base_layer.", ".") for n in state if ".lora_" not in n and "_quantizer." not in n} == names
    k_proj = model.get_submodule("model.language_model.layers.0.self_attn.k_proj")
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    seen = {}
    k_proj.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), out=out.detach()))
    with torch.no_grad():
        model(**_batch(loaded))
        x, out = seen["x"], seen["out"]
        base = k_proj.base_layer
        xq = k_proj.input_quantizer(x)
        delta = k_proj.lora_B["default"](k_proj.lora_A["default"](xq)) * k_proj.scaling["default"]
        plain = torch.nn.functional.linear(xq, base.weight_quantizer(base.weight), base.bias)
        want = k_proj.output_quantizer(plain + delta)
        wrong = k_proj.output_quantizer(plain) + delta  # PEFT's order without the relocation
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert not torch.allclose(out, wrong, atol=1e-4)
    q = k_proj.output_quantizer
    codes = out / q.scale.detach() + q.zero_point
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)  # the cache holds grid values


def test_feature_term_is_zero_in_float_and_positive_quantized(base_export: Path) -> None:
    loaded = load_vlm(str(base_export))
    model = loaded.model
    plugin = QALFT(encodings=str(base_export / "ptq.encodings"), mode="distill", feature_weight=2.0,
                   feature_layers=[1, -1])
    assert plugin.needs_hidden_states and not QALFT(base="float", mode="distill").needs_hidden_states
    plugin.transform(model)
    model.train()
    batch = {**_batch(loaded)}
    with quantization_disabled(model):
        terms = plugin.loss_terms(model, batch, model(**batch, output_hidden_states=True))
    assert set(terms) == {"distill", "features", "sft_reweight"}
    assert float(terms["features"]) == pytest.approx(0.0, abs=1e-9)  # B = 0 and float: student == teacher
    terms = plugin.loss_terms(model, batch, model(**batch, output_hidden_states=True))
    assert float(terms["features"]) > 1e-6 and terms["features"].requires_grad
    terms["features"].backward()
    grads = [p.grad for p in plugin.lora_parameters(model).values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the adapters learn from it
    with pytest.raises(RuntimeError, match="qalft: the training step's outputs hold no hidden_states"):
        plugin.loss_terms(model, batch, model(**batch))
    fresh = load_vlm(str(base_export)).model
    with pytest.raises(ValueError, match=r"qalft.feature_layers: \[7\] outside the model's 3 hidden states"):
        QALFT(encodings=str(base_export / "ptq.encodings"), mode="distill", feature_weight=1.0,
              feature_layers=[7]).transform(fresh)


def test_distill_term_is_zero_in_float_and_positive_quantized(base_export: Path) -> None:
    loaded = load_vlm(str(base_export))
    model = loaded.model
    plugin = QALFT(encodings=str(base_export / "ptq.encodings"), mode="distill", dropout=0.1)
    plugin.transform(model)
    model.train()
    batch = {**_batch(loaded)}
    with quantization_disabled(model):
        terms = plugin.loss_terms(model, batch, model(**batch))
    assert set(terms) == {"distill", "sft_reweight"}
    float_kl = float(terms["distill"].detach())
    assert float_kl == pytest.approx(0.0, abs=1e-9)  # B = 0 and float: student == teacher
    out = model(**batch)
    terms = plugin.loss_terms(model, batch, out)
    quant_kl = float(terms["distill"].detach())
    # The random tiny model's distributions are nearly uniform, so the quantization KL is small but clearly > 0.
    assert torch.isfinite(terms["distill"]) and quant_kl > 1e-8 and quant_kl > 100 * float_kl, (float_kl, quant_kl)
    assert float((out.loss + terms["sft_reweight"]).detach()) == pytest.approx(0.0, abs=1e-6)  # sft_weight 0 in distill
    assert all(q.enabled for q in quantizers_of(model).values()) and model.training
    with adapters_disabled(model):
        assert all(layer.disable_adapters for layer in lora_layers(model).values())
    assert not any(layer.disable_adapters for layer in lora_layers(model).values())


# ---------------------------------------------------------------------------------------------- fits
class _Probe(pl.Callback):
    """Records whether every quantizer was on during validation batches."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.initial = model_state(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.seen.append(all(q.enabled for q in quantizers_of(pl_module.model).values()))


def test_fixed_batch_loss_decreases_and_only_lora_changes(base_export: Path) -> None:
    loaded = load_vlm(str(base_export))
    model = loaded.model.train()
    plugin = QALFT(encodings=str(base_export / "ptq.encodings"), r=4, alpha=8.0)
    plugin.transform(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(plugin.lora_parameters(model).values())
    assert params and {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = _batch(loaded)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed), sorted(changed)[:3]


def test_fit_trains_only_lora_validates_quantized_and_resumes(base_export: Path, tmp_path: Path) -> None:
    qalft = _qalft(base_export / "ptq.encodings", mode="distill", sft_weight=0.5, temperature=2.0,
                   adapter_name="autofill", feature_weight=0.5, feature_layers=[1, -1])
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = make_cli(tiny_config(straight_dir, spec=str(base_export), max_steps=8, callbacks=[qalft],
                                    val_check_interval=4, limit_val_batches=1))
    probe = _Probe()
    straight.trainer.callbacks.append(probe)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    initial = probe.initial
    assert probe.seen and all(probe.seen), "quantizers must stay on during validation"
    logged = straight.trainer.callback_metrics
    for key in ("compression/qalft/kl", "compression/qalft/sft", "compression/qalft/loss_distill",
                "compression/qalft/feature_error", "compression/qalft/loss_features"):
        assert torch.isfinite(logged[key]), key
    final = model_state(straight.model)
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:3]
    assert any("lora_B" in k for k in changed)
    # resume from the step-4 checkpoint equals the uninterrupted run
    interrupted = make_cli(tiny_config(resumed_dir, spec=str(base_export), max_steps=8, callbacks=[qalft],
                                       **NO_VAL))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    resumed = make_cli(tiny_config(resumed_dir, spec=str(base_export), max_steps=8, callbacks=[qalft], **NO_VAL))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule,
                        ckpt_path=str(resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"))
    got = model_state(resumed.model)
    assert final.keys() == got.keys()
    for key in final:
        torch.testing.assert_close(got[key], final[key], rtol=0, atol=1e-6, msg=key)
    other = QALFT(base="float", adapter_name="autofill")
    with pytest.raises(ValueError, match="another QALFT configuration .*base"):
        other.load_state_dict(_plugin(straight).state_dict())


def _logits(model, batch):  # noqa: ANN001, ANN202
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_export_round_trip_and_one_plus_n(base_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "qat_w4a8"
    shutil.copytree(base_export, folder)
    batch = _batch(load_vlm(str(base_export)))
    trained = {}
    for task in ("autofill", "caption"):
        run_dir = tmp_path / task
        run_dir.mkdir()
        data = {**TINY_DATA, "init_args": {**TINY_DATA["init_args"], "tasks": {task: 1.0}}}
        config = tiny_config(run_dir, spec=str(folder), max_steps=3, data=data, **NO_VAL,
                             callbacks=[_qalft(folder / "ptq.encodings", adapter_name=task, adapters_to=str(folder),
                                               r=4, alpha=8.0)])
        before = _sha(folder)
        cli = make_cli(config, "--model.init_args.lr=0.03")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        after = _sha(folder)
        added = {k for k in after if k.startswith(f"adapters/{task}/")}
        assert added == {f"adapters/{task}/{f}" for f in
                         ("adapter_config.json", "adapter_model.safetensors", "vlmc_adapter.json")}
        assert {k: v for k, v in after.items() if k not in added} == before, "base and other adapters untouched"
        trained[task] = _logits(cli.model.model, batch)
        if task == "autofill":  # the full export of one run: base, encodings and its adapter in one folder
            main(["export", "--config", str(config), "--ckpt_path", str(run_dir / "ckpt" / "last.ckpt"),
                  "--out", str(tmp_path / "full")])
            with pytest.raises(FileExistsError, match="adapters/autofill exists"):
                _plugin(cli).add_to_export(cli.model.model, folder)
        else:
            model = cli.model.model
            scale = quantizers_of(model)["model.language_model.layers.1.mlp.down_proj.input"].scale
            with torch.no_grad():
                scale.mul_(1.5)
            with pytest.raises(ValueError, match=r"encodings in .* are not the ones .*down_proj.input"):
                check_base_matches(model, folder)
    assert float((trained["autofill"] - trained["caption"]).abs().max()) > 1e-3
    loaded = load_quantized_base(folder)
    assert sorted(loaded.model.peft_config) == ["autofill", "caption"]
    first = _logits(loaded.model, batch)
    torch.testing.assert_close(first, trained["autofill"], atol=0, rtol=0)
    set_adapter(loaded.model, "caption")
    torch.testing.assert_close(_logits(loaded.model, batch), trained["caption"], atol=0, rtol=0)
    set_adapter(loaded.model, "autofill")
    torch.testing.assert_close(_logits(loaded.model, batch), first, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"no adapter 'summary'"):
        set_adapter(loaded.model, "summary")
    full = tmp_path / "full"
    manifest = json.loads((full / "vlmc_export.json").read_text())
    assert "qalft.encodings" in manifest["plugins"]["qalft"]["files"]
    assert "adapters/autofill/adapter_model.safetensors" in manifest["plugins"]["qalft"]["files"]
    reloaded = load_quantized_base(full, encodings="qalft.encodings")
    torch.testing.assert_close(_logits(reloaded.model, batch), trained["autofill"], atol=0, rtol=0)
    peft = pytest.importorskip("peft")  # the adapter folder is PEFT's own layout
    config = peft.LoraConfig.from_pretrained(str(folder / "adapters" / "caption"))
    assert config.r == 4 and config.lora_alpha == 8.0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
