"""Compiled blocks stay compiled with plugins: no graph breaks beyond the model's own, no per-layer recompiles.

Dynamo compiles a transformer block's code once for every layer when nothing layer-specific is a constant of the
graph. A plugin that reads a tensor's value (a graph break) or keys on a Python int per layer makes each layer
compile its own graph, and past dynamo's recompile limit (8) the remaining layers run eagerly. The backend is
dynamo's `eager` here: what is checked is what dynamo traces, not the generated code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from helpers import make_cli, tiny_config

DATA = {"class_path": "framework.VLMDataModule",
        "init_args": {"tasks": {"caption": 1.0, "autofill": 1.0}, "image_size": 64, "batch_size": 4,
                      "batches_per_epoch": 12, "val_samples": 4, "max_length": 128, "pad_to_max_length": True}}
# Each one changes phase once in 8 steps (calibration -> quantizing, ranking -> pruning, dense -> masked): one
# recompile allowed per plugin.
PLUGINS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "qat": [{"class_path": "plugins.quantization.QuantizationAwareTraining", "init_args": {
        "weights": {"bits": 4, "granularity": "channel"},
        "activations": {"bits": 8, "granularity": "tensor", "symmetric": False},
        "start_step": 0, "calibration_batches": 2, "freeze_observers_at": None, "scale_lr": 1e-2,
        "activation_sites": [{"targets": {"include": "language_model.*(k_proj|v_proj)$"}, "points": ["output"],
                              "spec": {"bits": 8, "granularity": "token", "mode": "dynamic", "symmetric": False}}]}}],
    "l0": [{"class_path": "plugins.l0_pruning.L0Pruning", "init_args": {
        "target_fraction": 0.5, "method": "improved", "alternate_every": 100, "hard_from": 0.5, "target_warmup": 0.4}}],
    "ramp": [{"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "final_sparsity": 0.75, "start": 0.25, "end": 0.75, "update_every": 2, "score": "activation"}}],
    "ramp_2of4": [{"class_path": "plugins.sparsity.SparsityRamp", "init_args": {
        "pattern": "2:4", "start": 0.25, "end": 0.75, "update_every": 2}}],
    "ablation": [{"class_path": "plugins.channel_ablation.ChannelAblation",
                  "init_args": {"fraction": 0.25, "start_step": 4, "seed": 3}}],
}
# Stacked: one phase change each (the magnitude 2:4 ramp; the activation score also toggles its statistics hook,
# which multiplies the variants, a fixed set however many layers there are).
PLUGINS["qat+ramp"] = PLUGINS["qat"] + PLUGINS["ramp_2of4"]


def _compiled_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, callbacks: list[dict[str, Any]],
                  spec: str = "experiments/models/llava-test.json") -> dict[str, int]:
    original = torch.nn.Module.compile

    def compile_eager(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("mode", None)
        original(module, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = tiny_config(tmp_path, spec=spec, max_steps=8, callbacks=callbacks,
                         data=DATA, limit_val_batches=0, val_check_interval=None)
    cli = make_cli(config, "--model.init_args.compile=true")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    counters = torch._dynamo.utils.counters
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _compiled_fit(tmp_path_factory.mktemp("none"), monkeypatch, [])


def test_text_layers_share_one_graph(baseline: dict[str, int]) -> None:
    # The vision tower's and the text model's block, in training and in their first call: with a KV cache built
    # during training (use_cache on), each text layer compiled its own graph.
    assert baseline["graphs"] <= 4, baseline


@pytest.mark.parametrize("plugin", ["qat", "l0", "ramp", "ramp_2of4", "ablation", "qat+ramp"])
def test_plugin_keeps_blocks_compiled(plugin: str, baseline: dict[str, int], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    counts = _compiled_fit(tmp_path, monkeypatch, PLUGINS[plugin])
    assert counts["breaks"] == baseline["breaks"], (counts, baseline)  # the model's own breaks only
    assert counts["graphs"] <= baseline["graphs"] + len(PLUGINS[plugin]), (counts, baseline)  # phase changes


@pytest.mark.parametrize("plugin", ["none", "qat", "l0"])
def test_graph_count_does_not_grow_with_depth(plugin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twice the text layers (llava-tiny: 4, llava-test: 2), the same number of graphs."""
    (tmp_path / "shallow").mkdir()
    (tmp_path / "deep").mkdir()
    shallow = _compiled_fit(tmp_path / "shallow", monkeypatch, PLUGINS[plugin])
    deep = _compiled_fit(tmp_path / "deep", monkeypatch, PLUGINS[plugin], spec="experiments/models/llava-tiny.json")
    assert deep == shallow
