"""Glyph supervision: per-patch reading targets from the renderers, the head's loss, resume, export, stacking."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SPECS
from helpers import fit_straight_and_resumed, make_cli, model_state, tiny_config

from framework.cli import main
from framework.data.tasks import make_task
from framework.models import load_vlm
from framework.processing import GLYPH_CLASSES, GLYPH_SLOTS, VLMProcessor, family_for, glyph_targets
from plugins.glyph_supervision import GlyphSupervision

# The test LLaVA reads 32 px images as a 4x4 grid of 8 px patches; 64 px samples are resized to it.
DATA = {"class_path": "framework.VLMDataModule",
        "init_args": {"tasks": {"reading": 2.0, "autofill": 1.0, "caption": 1.0},
                      "image_size": 64, "batch_size": 6, "batches_per_epoch": 12, "val_samples": 6,
                      "max_length": 160}}
PLUGIN = {"class_path": "plugins.glyph_supervision.GlyphSupervision", "init_args": {"weight": 1.0}}
NO_VAL = {"limit_val_batches": 0, "val_check_interval": None}


@pytest.mark.parametrize("task", ["autofill", "reading"])
def test_targets_hold_every_printed_character_in_its_patch(task: str) -> None:
    sample = make_task(task, seed=1, image_size=128)[3]
    assert sample.glyphs and all(0 <= x < 128 and 0 <= y < 128 for _, x, y in sample.glyphs)
    printed = [char for char in sample.answer.upper() if not char.isspace()]
    if task == "reading":  # the answer is exactly the printed text
        assert [char for char, _, _ in sample.glyphs] == printed
    targets = glyph_targets(sample.glyphs, image_side=128, grid=16, slots=8)  # 8 px patches: no patch overflows
    assert targets.shape == (256, 8)
    wanted = Counter(GLYPH_CLASSES.index(char) + 1 for char, _, _ in sample.glyphs if char in GLYPH_CLASSES)
    assert Counter(targets[targets > 0].tolist()) == wanted
    for char, x, y in sample.glyphs:
        if char in GLYPH_CLASSES:
            assert GLYPH_CLASSES.index(char) + 1 in targets[int(y // 8) * 16 + int(x // 8)].tolist()


def test_targets_of_images_without_text_and_of_unknown_ones() -> None:
    caption = make_task("caption", seed=0, image_size=64)[0]
    assert caption.glyphs == []
    assert (glyph_targets(caption.glyphs, 64, 4) == 0).all()
    assert (glyph_targets(None, 64, 4) == -100).all()
    # Reading order inside a patch, and slots past the last dropped.
    glyphs = [("B", 5.0, 2.0), ("A", 1.0, 2.0), ("C", 1.0, 6.0), ("D", 6.0, 6.0)]
    assert glyph_targets(glyphs, 8, 1, slots=3).tolist() == [[11, 12, 13]]


def test_the_processor_batches_targets_per_image_for_fixed_grid_families() -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    family = family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor)
    assert "glyph_targets" not in VLMProcessor(family, 1024).encode([make_task("reading", seed=0, image_size=64)[0]])
    processor = VLMProcessor(family, 1024, glyph_targets=True)
    samples = [make_task("reading", seed=0, image_size=64)[0],
               make_task("longcall", seed=0, min_words=320, max_words=330)[0],
               make_task("caption", seed=0, image_size=64)[0]]
    batch = processor.encode(samples)
    assert batch["glyph_targets"].shape == (2, 16, GLYPH_SLOTS)  # two images, 4x4 patches
    assert (batch["glyph_targets"][0] > 0).any() and (batch["glyph_targets"][1] == 0).all()
    assert "glyph_targets" not in processor.encode(samples, with_answer=False)
    qwen = load_vlm(str(FAMILY_SPECS["qwen2_vl"]))
    qwen_processor = VLMProcessor(family_for(qwen.model.config, qwen.tokenizer, qwen.image_processor), 1024,
                                  glyph_targets=True)
    assert "glyph_targets" not in qwen_processor.encode(samples)  # dynamic resolution: no fixed grid
    # The plugin: no term for a text-only batch, a clear error for images without targets.
    plugin = GlyphSupervision()
    plugin.transform(loaded.model)
    text_only = processor.encode(samples[1:2])
    assert "pixel_values" not in text_only and plugin.loss_terms(loaded.model, text_only, None) == {}
    with pytest.raises(ValueError, match="no 'glyph_targets'"):
        plugin.loss_terms(loaded.model, {**batch, "glyph_targets": None}, None)


@pytest.mark.parametrize("weight", [0, -1.0, True, "1"])
def test_misconfiguration_fails_in_init(weight: object) -> None:
    with pytest.raises(ValueError, match=r"glyphs\.weight: must be a number > 0"):
        GlyphSupervision(weight=weight)


def test_a_model_without_a_fixed_grid_fails_at_start_up() -> None:
    qwen = load_vlm(str(FAMILY_SPECS["qwen2_vl"])).model
    with pytest.raises(ValueError, match="vision_tower"):
        GlyphSupervision().transform(qwen)


def test_fit_learns_to_read_patches_and_logs_accuracy(tmp_path: Path) -> None:
    """A real fit: the reading loss falls well below its start, validation reports character accuracy, and the
    head is part of the checkpointed model."""
    config = tiny_config(tmp_path, max_steps=30, callbacks=[PLUGIN], data=DATA, val_check_interval=10)
    cli = make_cli(config, "--model.init_args.lr=0.01")
    losses = []

    plugin = next(c for c in cli.trainer.callbacks if isinstance(c, GlyphSupervision))
    original = plugin.loss_terms

    def recording(model, batch, outputs):
        terms = original(model, batch, outputs)
        if terms:
            losses.append(float(terms["reading"]))
        return terms

    plugin.loss_terms = recording
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(losses) >= 25
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses
    accuracy = float(cli.trainer.callback_metrics["compression/glyphs/char_accuracy"])
    digits = float(cli.trainer.callback_metrics["compression/glyphs/digit_accuracy"])
    assert 0.0 <= accuracy <= 1.0 and 0.0 <= digits <= 1.0
    assert any(key.startswith("glyph_head.") for key in cli.model.model.state_dict())
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert "model.glyph_head.weight" in checkpoint["state_dict"]


def test_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    runs = fit_straight_and_resumed(
        tmp_path, lambda folder: tiny_config(folder, max_steps=8, callbacks=[PLUGIN], data=DATA, **NO_VAL))
    states = {name: model_state(cli.model) for name, cli in runs.items()}
    assert "glyph_head.weight" in states["straight"] and states["straight"].keys() == states["resumed"].keys()
    for key, value in states["straight"].items():
        torch.testing.assert_close(states["resumed"][key], value, rtol=0, atol=1e-6, msg=key)


def test_export_drops_the_head_and_loads_back(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=4, callbacks=[PLUGIN], data=DATA, **NO_VAL)
    cli = make_cli(config)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
          "--out", str(tmp_path / "export")])
    exported = load_vlm(str(tmp_path / "export")).model.state_dict()
    trained = {k: v for k, v in cli.model.model.state_dict().items() if not k.startswith("glyph_head.")}
    assert exported.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)


def test_stacks_with_a_sparsity_ramp(tmp_path: Path) -> None:
    ramp = {"class_path": "plugins.sparsity.SparsityRamp",
            "init_args": {"final_sparsity": 0.5, "start": 0.0, "end": 0.5, "update_every": 1,
                          "targets": {"include": "vision_tower"}}}
    cli = make_cli(tiny_config(tmp_path, max_steps=6, callbacks=[ramp, PLUGIN], data=DATA, **NO_VAL))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    weight = cli.model.model.get_submodule("model.vision_tower.encoder.layers.0.mlp.fc1").weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert torch.isfinite(cli.trainer.callback_metrics["compression/glyphs/loss_reading"])


def test_a_deep_copy_of_the_model_leaves_the_plugin_alone() -> None:
    """``vlmc bench`` deep-copies the trained model for its bf16 decode; a captured activation (not a graph leaf)
    once made that copy fail on an H100, and the copy's forwards must not feed the plugin."""
    import copy

    model = load_vlm("experiments/models/llava-test.json").model
    plugin = GlyphSupervision()
    plugin.transform(model)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, requires_grad=True)
    vision = model.get_submodule("model.vision_tower")
    vision(pixel_values=pixels * 2, output_hidden_states=True)  # a captured, non-leaf activation
    assert plugin._features is not None and plugin._features.grad_fn is not None
    captured = plugin._features
    twin = copy.deepcopy(model)
    assert hasattr(twin, "glyph_head")
    twin.get_submodule("model.vision_tower")(pixel_values=torch.randn(1, 3, size, size), output_hidden_states=True)
    assert plugin._features is captured


def test_validation_accuracy_counts_by_hand() -> None:
    """Characters and digits read right, counted over non-empty target slots only."""
    from types import SimpleNamespace

    plugin = GlyphSupervision()
    module = SimpleNamespace(device=torch.device("cpu"), model=None)
    plugin.on_validation_epoch_start(None, module)
    # One image, two patches, GLYPH_SLOTS slots: targets "4", "A", empty / "7", empty, empty.
    targets = torch.tensor([[[5, 11, 0], [8, 0, 0]]])
    predicted = torch.tensor([[[5, 12, 0], [9, 3, 0]]])  # "4" right, "A" wrong, "7" wrong; empty slots not counted
    plugin._logits = lambda model: torch.nn.functional.one_hot(predicted, 1 + len(GLYPH_CLASSES)).float()
    plugin._features = torch.zeros(1)
    plugin.on_validation_batch_end(None, module, None, {"pixel_values": torch.zeros(1), "glyph_targets": targets}, 0)
    assert [int(count) for count in plugin._read] == [1, 3, 1, 2]  # chars right / printed, digits right / printed
