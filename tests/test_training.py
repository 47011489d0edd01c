"""Real fits through the CLI: both families, summary and checkpoint, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import StopAt, fit_straight_and_resumed, make_cli, model_state, tiny_config

from framework.cli import main


@pytest.mark.parametrize("spec", ["experiments/models/llava-test.json", "experiments/models/qwen2vl-test.json"])
def test_fit_writes_summary_checkpoint_and_learns(tmp_path: Path, spec: str, capsys: pytest.CaptureFixture) -> None:
    config = tiny_config(tmp_path, spec=spec, max_steps=12)
    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    assert "Final evaluation at step 12" in out and "val/autofill" in out
    summary_path = next(tmp_path.rglob("summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["global_step"] == 12 and summary["eval_step"] == 12
    # What the numbers ran on, so two runs that differ can be told apart.
    env = summary["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["transformers"]
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu" and env["python"]
    for key in ("val/autofill/field_f1", "val/autofill/exact_match", "val/caption/fact_recall",
                "val/caption/rouge_l", "val/caption/loss", "val/caption/ppl", "val/autofill/fields/type"):
        assert key in summary["metrics"]
    assert "fields/type" not in out  # per-field values go to the summary and logs, not the printed table
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # Loss fell from its untrained value (ln(vocab) ~ 7.6) within twelve steps.
    assert summary["metrics"]["val/loss"] < 7.35
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files left behind"


ABLATION = {"class_path": "plugins.channel_ablation.ChannelAblation",
            "init_args": {"fraction": 0.25, "start_step": 5, "seed": 3}}


@pytest.mark.parametrize("spec", ["experiments/models/llava-test.json", "experiments/models/qwen2vl-test.json"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, spec: str) -> None:
    """Stopped at step 4 (mid-epoch, before the plugin switches on) and resumed: same weights, masks and data."""
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    straight = make_cli(tiny_config(straight_dir, spec=spec, max_steps=10, callbacks=[ABLATION]))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    interrupted = make_cli(tiny_config(resumed_dir, spec=spec, max_steps=10, callbacks=[ABLATION]))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    assert interrupted.trainer.global_step == 4
    checkpoint = resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_file()

    resumed = make_cli(tiny_config(resumed_dir, spec=spec, max_steps=10, callbacks=[ABLATION]))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(checkpoint))
    assert resumed.trainer.global_step == 10
    want, got = model_state(straight.model), model_state(resumed.model)
    assert want.keys() == got.keys()
    assert any(k.endswith("channel_mask") for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert resumed.datamodule.state_dict() == straight.datamodule.state_dict()


def test_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    cli = make_cli(tiny_config(tmp_path, max_steps=4, callbacks=[ABLATION]))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["callbacks"]["ChannelAblation[channel_ablation]"]
    assert state == {"active": False, "fraction": 0.25, "seed": 3}


def test_validation_logs_its_wall_clock(tmp_path: Path) -> None:
    cli = make_cli(tiny_config(tmp_path, max_steps=4))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    validation, elapsed = float(metrics["time/validation_s"]), float(metrics["time/since_train_start_s"])
    assert 0 < validation <= elapsed


def test_missing_checkpoint_path_is_named(tmp_path: Path) -> None:
    cli = make_cli(tiny_config(tmp_path, max_steps=2))
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(tmp_path / "nothere.ckpt"))


def test_compile_mode_is_checked() -> None:
    from framework.module import VLMModule

    with pytest.raises(ValueError, match=r"model.compile_mode: must be one of 'default', 'reduce-overhead'"):
        VLMModule(model="experiments/models/llava-test.json", compile_mode="fast")


def test_compiled_blocks_on_fixed_shape_batches_train_like_eager(tmp_path: Path) -> None:
    """Regional compilation with every training batch padded to max_length: one shape, same losses as eager."""
    data = {"class_path": "framework.VLMDataModule",
            "init_args": {"tasks": {"caption": 1.0, "autofill": 1.0}, "image_size": 64, "batch_size": 4,
                          "batches_per_epoch": 6, "val_samples": 4, "max_length": 128, "pad_to_max_length": True}}
    losses = {}
    for compiled in (False, True):
        folder = tmp_path / f"compiled_{compiled}"
        folder.mkdir()
        cli = make_cli(tiny_config(folder, max_steps=3, data=data, limit_val_batches=0, val_check_interval=None),
                       f"--model.init_args.compile={str(compiled).lower()}")
        widths = []
        original = cli.model.training_step

        def step(batch, batch_idx, original=original, widths=widths):  # noqa: ANN001, ANN202
            widths.append(batch["input_ids"].shape[1])
            out = original(batch, batch_idx)
            losses.setdefault(compiled, []).append(float(out["loss"] if isinstance(out, dict) else out))
            return out

        cli.model.training_step = step
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert widths and set(widths) == {128}
        names = {k for k in model_state(cli.model) if "val_" not in k}
        assert not any("_orig_mod" in k for k in names)  # parameter names unchanged by compilation
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-3)


def test_fused_adamw_keeps_gradient_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a gradient scaler the module clips gradients itself, so the fused AdamW (CUDA's default) clips as
    Lightning's path does for a foreach AdamW. Forced on here: CPU has a fused AdamW too."""
    from framework.module import VLMModule

    final = {}
    for fused, clip in ((False, 0.05), (True, 0.05), (True, None)):
        monkeypatch.setattr(VLMModule, "_fused_optimizer", lambda self, fused=fused: fused)
        folder = tmp_path / f"fused_{fused}_{clip}"
        folder.mkdir()
        cli = make_cli(tiny_config(folder, max_steps=4, limit_val_batches=0, val_check_interval=None,
                                   gradient_clip_val=clip))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert cli.trainer.optimizers[0].defaults["fused"] is fused
        final[(fused, clip)] = {k: v for k, v in model_state(cli.model).items() if "val_" not in k}
    for key, value in final[(False, 0.05)].items():
        torch.testing.assert_close(final[(True, 0.05)][key], value, rtol=1e-4, atol=1e-5, msg=key)
    unclipped = max(float((final[(True, None)][k] - v).abs().max()) for k, v in final[(True, 0.05)].items())
    assert unclipped > 1e-3, "clipping at 0.05 changes the training"


def test_learning_rate_schedule_by_hand() -> None:
    from framework.module import lr_factor

    # 100 steps, 10 warm-up steps: cosine from step 10 on, or (warmup-stable-decay) held until step 60.
    assert [lr_factor(s, 100, 10, 0.1) for s in (0, 9)] == [0.1, 1.0]
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert [lr_factor(s, 100, 10, 0.1, decay_from=60) for s in (9, 10, 59)] == [1.0, 1.0, 1.0]
    assert lr_factor(80, 100, 10, 0.1, decay_from=60) == pytest.approx(0.55)
    assert lr_factor(100, 100, 10, 0.1, decay_from=60) == pytest.approx(0.1)


def test_decay_fraction_sets_the_trained_schedule(tmp_path: Path) -> None:
    from framework.module import VLMModule

    with pytest.raises(ValueError, match=r"model.decay_fraction: must be in \(0, 1\], got 0"):
        VLMModule(model="experiments/models/llava-test.json", decay_fraction=0.0)
    rates = []
    cli = make_cli(tiny_config(tmp_path, max_steps=8, limit_val_batches=0, val_check_interval=None),
                   "--model.init_args.decay_fraction=0.5")

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = cli.model.hparams.lr
    # warm-up 2 steps (0.25 of 8), held at the peak until step 4, then cosine down to 0.1 of it
    assert rates[:2] == pytest.approx([peak / 2, peak]) and rates[2:5] == pytest.approx([peak] * 3)
    assert rates[5] < peak and rates[7] < rates[6] < rates[5]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_training_batches_drop_the_padding_mask_without_changing_the_loss(family: str) -> None:
    """Right-padded teacher-forced batches: causal attention alone hides the padding, so the loss and the logits
    of every real token are what the masked forward gives."""
    from conftest import FAMILY_SPECS

    from framework.data.tasks import make_task
    from framework.models import load_vlm
    from framework.module import model_inputs, training_inputs
    from framework.processing import VLMProcessor, family_for

    loaded = load_vlm(str(FAMILY_SPECS[family]))
    model = loaded.model.eval()
    processor = VLMProcessor(family_for(model.config, loaded.tokenizer, loaded.image_processor), 512)
    # A short caption beside a long card: the caption's row is mostly padding.
    batch = processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[1]])
    assert (batch["attention_mask"] == 0).any()
    inputs = training_inputs(batch)
    assert "attention_mask" not in inputs and "labels" in inputs
    with torch.no_grad():
        masked, causal = model(**model_inputs(batch)), model(**inputs)
    torch.testing.assert_close(causal.loss, masked.loss, atol=1e-5, rtol=0)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(causal.logits[real], masked.logits[real], atol=1e-4, rtol=0)
    assert "attention_mask" in model_inputs(processor.encode([make_task("caption")[0]], with_answer=False))


def test_lr_multipliers_scale_matching_parameters(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=3, limit_val_batches=0, val_check_interval=None)
    cli = make_cli(config, '--model.init_args.lr_multipliers={"vision_tower": 3.0, "lm_head|embed": 0.5}')
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    optimizer = cli.trainer.optimizers[0]
    owner = {id(p): name for name, p in cli.model.model.named_parameters()}
    base = cli.model.hparams.lr * optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
    seen = set()
    for group in optimizer.param_groups:
        names = [owner[id(p)] for p in group["params"]]
        factor = 3.0 if "vision_tower" in names[0] else 0.5 if ("lm_head" in names[0] or "embed" in names[0]) else 1.0
        assert all((3.0 if "vision_tower" in n else 0.5 if ("lm_head" in n or "embed" in n) else 1.0) == factor
                   for n in names)
        assert group["initial_lr"] == pytest.approx(cli.model.hparams.lr * factor)
        assert group["lr"] == pytest.approx(base * factor)  # the same schedule for every group
        seen.add(factor)
        assert group["weight_decay"] in (0.0, cli.model.hparams.weight_decay)
    assert seen == {0.5, 1.0, 3.0}


def test_lr_multipliers_are_checked(tmp_path: Path) -> None:
    from framework.module import VLMModule

    with pytest.raises(ValueError, match=r"model.lr_multipliers: '\(' is not a valid regex"):
        VLMModule(model="experiments/models/llava-test.json", lr_multipliers={"(": 2.0})
    with pytest.raises(ValueError, match=r"the factor of 'vision' must be a positive number, got 0"):
        VLMModule(model="experiments/models/llava-test.json", lr_multipliers={"vision": 0})
    cli = make_cli(tiny_config(tmp_path, max_steps=1, limit_val_batches=0, val_check_interval=None),
                   '--model.init_args.lr_multipliers={"no_such_module": 2.0}')
    with pytest.raises(ValueError, match=r"\['no_such_module'\] match no trainable parameter"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_lr_multipliers_resume_like_an_uninterrupted_run(tmp_path: Path) -> None:
    runs = fit_straight_and_resumed(
        tmp_path, lambda folder: tiny_config(folder, max_steps=8, limit_val_batches=0, val_check_interval=None),
        '--model.init_args.lr_multipliers={"vision_tower": 3.0}')
    straight, resumed = (model_state(runs[name].model) for name in ("straight", "resumed"))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_two_processes_train_bit_identical_weights_whatever_the_hash_seed(tmp_path: Path) -> None:
    """Seeded runs repeat exactly: two fresh processes, with different string-hash seeds (set and dict orders of
    strings change with them), end with the same weights to the last bit."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    states = []
    for hash_seed in ("0", "1"):
        folder = tmp_path / f"hash{hash_seed}"
        folder.mkdir()
        config = tiny_config(folder, max_steps=6, limit_val_batches=0)
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "WANDB_MODE": "disabled",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, "-m", "framework.cli", "fit", "--config", str(config)], cwd=folder, env=env,
                       check=True, capture_output=True, timeout=600)
        states.append(torch.load(folder / "ckpt" / "last.ckpt", weights_only=True)["state_dict"])
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


@pytest.mark.parametrize(("init_args", "compile", "key"), [
    ({"data_parallel_size": 1, "tensor_parallel_size": 2}, False, "tensor_parallel_size"),
    ({"data_parallel_size": 1, "tensor_parallel_size": 1}, False, "save_distributed_checkpoint"),
    ({"data_parallel_size": 1, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}, True,
     "model.init_args.compile"),
])
def test_model_parallel_strategy_misconfiguration(init_args: dict, compile: bool, key: str) -> None:
    """ModelParallelStrategy runs as FSDP2 data parallelism: tensor parallelism, sharded checkpoints (not written
    atomically, not read by export) and compiled blocks are refused with the key to change."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from framework.module import check_strategy

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(**init_args))
    with pytest.raises(ValueError, match=re.escape(key)):
        check_strategy(trainer, compile=compile)
    check_strategy(SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                                                  save_distributed_checkpoint=False)))


def test_model_parallel_strategy_with_sharded_checkpoints_fails_at_start_up(tmp_path: Path) -> None:
    """Through the CLI: the strategy's defaults (sharded checkpoints) stop the run before training, naming the key."""
    config = tiny_config(tmp_path, strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
                         accelerator="cpu", devices=1)
    try:
        with pytest.raises(ValueError, match=r"trainer\.strategy\.init_args\.save_distributed_checkpoint"):
            main(["fit", "--config", str(config)])
    finally:  # the strategy set up a one-process group before the module refused it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()
