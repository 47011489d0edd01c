"""The plugin contract, exercised through the built-in ChannelAblation plugin and a second test plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import FAMILY_SPECS
from helpers import make_cli, tiny_config
from safetensors.torch import load_file

from framework.data.tasks import make_task
from framework.export import export_model
from framework.models import load_vlm
from framework.plugin import CompressionPlugin, PluginConflictError, check_plugins
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from plugins.channel_ablation import ChannelAblation, channel_mask_of


def _lm_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return ModuleSelection(include="language_model", exclude="lm_head").select(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 1.0}, r"ChannelAblation.fraction: must be in \[0, 1\)"),
        ({"fraction": -0.1}, r"ChannelAblation.fraction"),
        ({"start_step": -1}, "ChannelAblation.start_step: must be >= 0"),
    ],
)
def test_misconfiguration_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelAblation(**kwargs)


def test_bad_regex_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"targets.exclude: '\(unclosed' is not a valid regular expression"):
        ModuleSelection(exclude="(unclosed")


def test_targets_matching_nothing_fail_in_transform() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    plugin = ChannelAblation(targets=ModuleSelection(include="no_such_module"), name="ablate")
    with pytest.raises(ValueError, match="ablate.targets: include='no_such_module' .* matched no module"):
        plugin.transform(model)


def test_transform_is_idempotent_and_masks_outputs() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    plugin = ChannelAblation(fraction=0.5, seed=1)
    plugin.transform(model)
    first = {n: channel_mask_of(m).clone() for n, m in plugin.layers.items()}
    plugin.transform(model)
    assert all(torch.equal(first[n], channel_mask_of(m)) for n, m in plugin.layers.items())
    name, layer = next(iter(plugin.layers.items()))
    hooks = len(layer._forward_hooks)
    assert hooks == 1, "a second transform must not stack hooks"
    x = torch.randn(3, layer.in_features)
    zeroed = channel_mask_of(layer) == 0
    assert zeroed.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (layer(x)[:, zeroed] == 0).all()
    plugin.active = False
    assert (layer(x)[:, zeroed] != 0).any()


def test_same_seed_same_masks_any_order() -> None:
    a, b = load_vlm(str(FAMILY_SPECS["llava"])).model, load_vlm(str(FAMILY_SPECS["llava"])).model
    ChannelAblation(seed=4).transform(a)
    ChannelAblation(seed=4).transform(b)
    for (name, la), (_, lb) in zip(_lm_linears(a).items(), _lm_linears(b).items()):
        assert torch.equal(channel_mask_of(la), channel_mask_of(lb)), name


def test_fit_applies_schedule_and_logs(tmp_path: Path) -> None:
    callbacks = [{"class_path": "plugins.channel_ablation.ChannelAblation",
                  "init_args": {"fraction": 0.25, "start_step": 3}}]
    cli = make_cli(tiny_config(tmp_path, max_steps=6, callbacks=callbacks))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = next(c for c in cli.trainer.callbacks if isinstance(c, ChannelAblation))
    assert plugin.active
    logged = cli.trainer.callback_metrics
    assert logged["compression/channel_ablation/active"] == 1.0
    assert logged["compression/channel_ablation/zeroed_fraction"] == pytest.approx(0.25, abs=0.03)
    # The masks are buffers of the model, so the checkpoint holds them.
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert sum(k.endswith("channel_mask") for k in state) == len(plugin.layers)


def test_step_metrics_are_logged_only_where_the_trainer_writes_them(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning writes step metrics every ``log_every_n_steps`` (and overwrites the others unread): plugins log
    them, and compute lazy ones, only then, since each call costs host time a GPU step waits for. The written
    logs are what they were."""
    import csv

    from lightning.pytorch import LightningModule

    calls: list[tuple[int, str]] = []
    original = LightningModule.log

    def counting_log(self, name, value, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name.startswith("compression/"):
            calls.append((self.trainer.global_step, name))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(LightningModule, "log", counting_log)
    callbacks = [{"class_path": "plugins.channel_ablation.ChannelAblation",
                  "init_args": {"fraction": 0.25, "start_step": 3}}]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}}
    cli = make_cli(tiny_config(tmp_path, max_steps=8, callbacks=callbacks, log_every_n_steps=4, logger=logger,
                               limit_val_batches=0))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # on_train_batch_end runs before global_step counts the batch's step: steps 3 and 7 are the 4th and 8th batch.
    assert sorted({step for step, _ in calls}) == [3, 7], calls
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    written = [r for r in rows if r.get("compression/channel_ablation/active")]
    assert [int(r["step"]) for r in written] == [3, 7]
    assert [float(r["compression/channel_ablation/active"]) for r in written] == [1.0, 1.0]


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_export_round_trip(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForImageTextToText

    loaded = load_vlm(str(FAMILY_SPECS[family]))
    plugin = ChannelAblation(fraction=0.5)
    plugin.transform(loaded.model)
    loaded.model.eval()
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    batch = processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[0]])
    masked_logits = loaded.model(**batch).logits
    out = export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    # The deployed model is a plain HF model: masks are baked into the weights, no extra tensors.
    exported = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("channel_mask" in k for k in exported.state_dict())
    torch.testing.assert_close(exported(**batch).logits, masked_logits, rtol=1e-5, atol=1e-5)
    masks = load_file(out / "channel_ablation.safetensors")
    assert len(masks) == len(plugin.layers)
    manifest = json.loads((out / "vlmc_export.json").read_text())
    assert manifest["plugins"]["channel_ablation"]["files"] == ["channel_ablation.safetensors", "channel_ablation.json"]
    # The original (training) model still has its masks: export works on a copy.
    assert all(channel_mask_of(m) is not None for m in plugin.layers.values())


def test_export_never_half_written(tmp_path: Path) -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))

    class Exploding(CompressionPlugin):
        name = "exploding"

        def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [Exploding()])
    assert not (tmp_path / "export").exists()
    assert not list(tmp_path.iterdir()), "the temporary folder is cleaned up"
    with pytest.raises(FileExistsError, match="overwrite"):
        (tmp_path / "export").mkdir()
        export_model(loaded.model, loaded.tokenizer, loaded.image_processor, tmp_path / "export")


def test_overlapping_plugins_fail_at_startup() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    a = ChannelAblation(name="first")
    b = ChannelAblation(name="second", targets=ModuleSelection(include=r"language_model.*mlp"))
    for plugin in (a, b):
        plugin.transform(model)
    with pytest.raises(PluginConflictError, match="'first' .* and 'second' .* both rewrite .*mlp"):
        check_plugins([a, b], model)


def test_disjoint_plugins_stack_and_duplicate_names_fail() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    attention = ChannelAblation(name="attn", targets=ModuleSelection(include=r"language_model.*self_attn"))
    mlp = ChannelAblation(name="mlp", targets=ModuleSelection(include=r"language_model.*mlp"))
    vision = ChannelAblation(name="vision", targets=ModuleSelection(include="vision_tower"))
    for plugin in (attention, mlp, vision):
        plugin.transform(model)
    check_plugins([attention, mlp, vision], model)
    assert {attention.state_key, mlp.state_key, vision.state_key} == {
        "ChannelAblation[attn]", "ChannelAblation[mlp]", "ChannelAblation[vision]"}
    with pytest.raises(PluginConflictError, match="share the name 'attn'"):
        check_plugins([attention, ChannelAblation(name="attn")], model)


def test_stacked_plugins_in_one_fit(tmp_path: Path) -> None:
    callbacks = [
        {"class_path": "plugins.channel_ablation.ChannelAblation",
         "init_args": {"name": "text", "fraction": 0.25, "targets": {"include": "language_model", "exclude": "lm_head"}}},
        {"class_path": "plugins.channel_ablation.ChannelAblation",
         "init_args": {"name": "vision", "fraction": 0.5, "targets": {"include": "vision_tower"}}},
    ]
    cli = make_cli(tiny_config(tmp_path, max_steps=3, callbacks=callbacks))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert metrics["compression/text/zeroed_fraction"] == pytest.approx(0.25, abs=0.03)
    assert metrics["compression/vision/zeroed_fraction"] == pytest.approx(0.5, abs=0.03)


def test_conflicting_config_fails_before_training(tmp_path: Path) -> None:
    callbacks = [{"class_path": "plugins.channel_ablation.ChannelAblation", "init_args": {"name": "a"}},
                 {"class_path": "plugins.channel_ablation.ChannelAblation", "init_args": {"name": "b"}}]
    cli = make_cli(tiny_config(tmp_path, max_steps=3, callbacks=callbacks))
    with pytest.raises(PluginConflictError, match="both rewrite"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_plugin_state_must_be_scalar() -> None:
    class Bad(CompressionPlugin):
        name = "bad"

        def plugin_state(self) -> dict:
            return {"mask": torch.ones(3)}

    with pytest.raises(TypeError, match=r"Bad.plugin_state\(\)\['mask'\] is a Tensor"):
        Bad().state_dict()


def test_resume_with_other_masks_is_refused() -> None:
    plugin = ChannelAblation(seed=1)
    with pytest.raises(ValueError, match="seed=2 .* the config says seed=1"):
        plugin.load_state_dict({"active": True, "fraction": 0.25, "seed": 2})


def test_config_echo_is_saved_and_a_changed_config_is_refused() -> None:
    class Scheduled(CompressionPlugin):
        name = "scheduled"
        config_name = "scheduling"

        def __init__(self, every: int) -> None:
            self.every, self.step, self.restored = every, 0, None

        def config_echo(self) -> dict:
            return {"every": self.every, "kind": "cubic"}

        def plugin_state(self) -> dict:
            return {"step": self.step}

        def load_plugin_state(self, state: dict) -> None:
            self.restored = state

    saved = Scheduled(every=10)
    saved.step = 7
    state = saved.state_dict()
    assert state == {"step": 7, "config": json.dumps({"every": 10, "kind": "cubic"}, sort_keys=True)}
    same = Scheduled(every=10)
    same.load_state_dict(state)
    assert same.restored == {"step": 7}  # the plugin sees its own state; the framework kept the echo
    with pytest.raises(ValueError, match=r"scheduled: the checkpoint was made with another scheduling configuration "
                                         r"\(every: checkpoint 10, config 20\); a resumed run must use the same one"):
        Scheduled(every=20).load_state_dict(state)
    Scheduled(every=20).load_state_dict({"step": 3})  # a checkpoint without an echo (older runs) is not compared
