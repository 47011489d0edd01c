"""Shared input quantizers: siblings that read one tensor (q/k/v, gate/up) quantize it once, with one encoding.

The integer runtime on a shared-input export: ``tests/test_quantization.py::test_integer_runtime_reproduces_fake_quant``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SPECS
from helpers import StopAt, make_cli, model_state, tiny_config

from framework.cli import main
from framework.models import load_vlm
from framework.selection import ModuleSelection
from plugins.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
    QuantSpec,
    load_encodings,
    quantizers_of,
)
from plugins.quantization.adapters import attach_from_encodings

QAT = "plugins.quantization.QuantizationAwareTraining"
GROUPS = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
TEXT = {"include": "language_model", "exclude": "lm_head"}
ACT8 = QuantSpec(bits=8, granularity="tensor", symmetric=False)


def _qat_config(**kwargs) -> dict:
    return {"class_path": QAT, "init_args": {
        "weights": {"bits": 4, "granularity": "channel"},
        "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
        "targets": TEXT, "start_step": 1, "calibration_batches": 2, "scale_lr": 1e-2, "shared_inputs": GROUPS,
        **kwargs}}


def _layer_inputs(model: torch.nn.Module, layer: int = 0) -> dict[str, object]:
    quantizers = quantizers_of(model)
    prefix = f"model.language_model.layers.{layer}."
    return {name[len(prefix):]: q for name, q in quantizers.items()
            if name.startswith(prefix) and name.endswith(".input")}


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shared_inputs": [["q_proj"]]}, r"shared_inputs\[0\]: a group is a list of two or more"),
        ({"shared_inputs": "q_proj,k_proj"}, r"shared_inputs: a list of sibling-name groups"),
        ({"shared_inputs": GROUPS, "activations": None}, r"shared_inputs: shares input quantizers, so it needs"),
        ({"shared_inputs": GROUPS, "activation_points": ["output"]}, r"shared_inputs: .*'input' in activation_points"),
    ],
)
def test_misconfiguration_fails_in_init(kwargs: dict, message: str) -> None:
    base = {"weights": QuantSpec(bits=4), "activations": ACT8}
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**{**base, **kwargs})


def test_model_dependent_checks_fail_in_transform() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    unknown = PostTrainingQuantization(weights=None, activations=ACT8, targets=ModuleSelection(**TEXT),
                                       shared_inputs=[["query", "key"]])
    with pytest.raises(ValueError, match=r"shared_inputs\[0\]: no module has the siblings \['query', 'key'\]"):
        unknown.transform(model)
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    partial = PostTrainingQuantization(weights=None, activations=ACT8,
                                       targets=ModuleSelection(include=r"language_model.*(q_proj|k_proj)$"),
                                       shared_inputs=[["q_proj", "k_proj", "v_proj"]])
    with pytest.raises(ValueError, match=r"shared_inputs\[0\]: .*v_proj.input not quantized while .*q_proj.input is"):
        partial.transform(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_siblings_share_one_quantizer_in_both_families(family: str) -> None:
    model = load_vlm(str(FAMILY_SPECS[family])).model
    plugin = PostTrainingQuantization(weights=QuantSpec(bits=4), activations=ACT8, targets=ModuleSelection(**TEXT),
                                      shared_inputs=GROUPS)
    plugin.transform(model)
    plugin.transform(model)  # idempotent
    inputs = _layer_inputs(model)
    assert inputs["self_attn.q_proj.input"] is inputs["self_attn.k_proj.input"] is inputs["self_attn.v_proj.input"]
    assert inputs["mlp.gate_proj.input"] is inputs["mlp.up_proj.input"]
    assert inputs["self_attn.o_proj.input"] is not inputs["self_attn.q_proj.input"]
    layers = model.config.text_config.num_hidden_layers
    summary = plugin.summary(model)
    assert summary["activation_quantizers"] == 4 * layers  # qkv, o, gate/up, down per layer
    assert summary["shared_tensors"] == 3 * layers and summary["quantizers"] == 7 * layers + 4 * layers
    assert len({id(q) for q in plugin.quantizers.values()}) == 7 * layers + 4 * layers


# ---------------------------------------------------------------------------------------------- QAT run
def test_qat_fit_export_and_reload_keep_the_sharing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=8, callbacks=[_qat_config()], limit_val_batches=0)  # last.ckpt at 8
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    inputs = _layer_inputs(cli.model.model)
    shared = inputs["self_attn.q_proj.input"]
    assert shared is inputs["self_attn.v_proj.input"] and shared.is_initialized
    assert plugin.summary(cli.model.model)["shared_tensors"] == 3 * 2  # k, v and up in each of 2 layers
    # Scales learned once: one parameter in the optimizer, trained by all three consumers.
    params = [p for group in cli.trainer.optimizers[0].param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params})
    assert sum(p is shared.scale for p in params) == 1
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    encodings = json.loads((tmp_path / "export" / "qat.encodings").read_text())
    acts = encodings["activation_encodings"]
    name = "model.language_model.layers.0.{}.input".format
    assert acts[name("self_attn.k_proj")] == acts[name("self_attn.q_proj")] == acts[name("self_attn.v_proj")]
    sharing = encodings["vlmc"]["shared_activations"]
    assert sharing[name("self_attn.v_proj")] == name("self_attn.q_proj")
    assert sharing[name("mlp.up_proj")] == name("mlp.gate_proj")
    assert name("self_attn.o_proj") not in sharing
    # A fresh model from the encodings (the QALFT base path) shares the same way and loads them.
    fresh = load_vlm(str(FAMILY_SPECS["llava"])).model
    attach_from_encodings(fresh, encodings)
    again = _layer_inputs(fresh)
    assert again["self_attn.q_proj.input"] is again["self_attn.k_proj.input"]
    for got, want in zip(again["self_attn.q_proj.input"].qparams(), shared.qparams(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=0)
    # Strict: a model that does not share, or encodings that disagree within a shared quantizer, are errors.
    unshared = load_vlm(str(FAMILY_SPECS["llava"])).model
    PostTrainingQuantization(weights=QuantSpec(bits=4, granularity="channel"),
                             activations=ACT8, targets=ModuleSelection(**TEXT)).transform(unshared)
    with pytest.raises(ValueError, match=r"shares .*_proj.input's quantizer in the encodings but has its own"):
        load_encodings(unshared, encodings)
    bad = json.loads(json.dumps(encodings))
    bad["activation_encodings"][name("self_attn.k_proj")][0]["scale"] *= 2
    target = load_vlm(str(FAMILY_SPECS["llava"])).model
    with pytest.raises(ValueError, match=r"share one quantizer but have different encodings"):
        attach_from_encodings(target, bad)


def test_qat_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    qat = _qat_config(freeze_observers_at=7)
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = make_cli(tiny_config(straight_dir, max_steps=8, callbacks=[qat], limit_val_batches=0))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    interrupted = make_cli(tiny_config(resumed_dir, max_steps=8, callbacks=[qat], limit_val_batches=0))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    resumed = make_cli(tiny_config(resumed_dir, max_steps=8, callbacks=[qat], limit_val_batches=0))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule,
                        ckpt_path=str(resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"))
    want, got = model_state(straight.model), model_state(resumed.model)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    inputs = _layer_inputs(resumed.model.model)
    assert inputs["self_attn.q_proj.input"] is inputs["self_attn.k_proj.input"]
