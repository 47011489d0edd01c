"""The `vlmc` command: help speed, every shipped YAML parses, export and bench verbs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import tiny_config

from framework.cli import build, main

EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))  # results/ holds the configs of recorded runs


def test_top_level_help_is_fast() -> None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "framework.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    elapsed = time.perf_counter() - start
    assert "export" in result.stdout and "bench" in result.stdout and "fit" in result.stdout
    assert elapsed < 5.0, f"vlmc --help took {elapsed:.1f}s"


def test_unknown_verb() -> None:
    with pytest.raises(SystemExit, match="unknown verb 'train'"):
        main(["train"])


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(ROOT)) for p in EXPERIMENTS])
def test_every_experiment_yaml_parses(path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each shipped config parses and validates against the classes it names (nothing is instantiated).

    A fragment (no ``model`` section, e.g. csv_logger.yaml) is parsed on top of the quickstart, as it is used.
    """
    import yaml

    configs = ["--config", str(path)]
    if "model" not in (yaml.safe_load(path.read_text()) or {}):
        configs = ["--config", str(ROOT / "experiments" / "quickstart.yaml"), *configs]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: framework.VLMModule" in printed or "class_path: framework.module.VLMModule" in printed


def test_unknown_key_names_it(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    with pytest.raises(SystemExit):
        build(["--config", str(config), "--data.init_args.bacth_size=3"], run=False)


def test_fit_saves_its_config_in_the_run_folder(tmp_path: Path) -> None:
    import yaml

    config = tiny_config(tmp_path, max_steps=2, name="run.yaml")
    run_folder = tmp_path / "runs" / "first"
    main(["fit", "--config", str(config), f"--checkpoint.dirpath={run_folder / 'checkpoints'}",
          "--trainer.limit_val_batches=0"])
    saved = yaml.safe_load((run_folder / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2 and saved["model"]["class_path"].endswith("VLMModule")
    assert not (tmp_path / "config.yaml").exists()


def test_last_checkpoint_holds_the_final_step(tmp_path: Path) -> None:
    """max_steps not a multiple of every_n_train_steps: last.ckpt is still the end of training (Lightning alone
    kept the step-4 weights there), and the periodic checkpoints stay as they were."""
    config = tiny_config(tmp_path, max_steps=6)  # checkpoints every 4 steps
    main(["fit", "--config", str(config), "--trainer.limit_val_batches=0"])
    folder = tmp_path / "ckpt"
    last = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_fit_leaves_an_offline_wandb_run_unless_disabled(tmp_path: Path, mode: str) -> None:
    # A process of its own: W&B keeps its settings process-wide once a run has started.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"} | {"WANDB_MODE": mode}
    config = tiny_config(tmp_path, max_steps=2, name="wb.yaml")
    result = subprocess.run([sys.executable, "-m", "framework.cli", "fit", "--config", str(config),
                             f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                             "--trainer.limit_val_batches=0"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    if mode == "offline":
        assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), "an offline W&B run with its log file"
    else:
        assert runs == [], "WANDB_MODE=disabled writes no W&B run"


def test_export_verb_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForImageTextToText

    callbacks = [{"class_path": "plugins.channel_ablation.ChannelAblation", "init_args": {"fraction": 0.25}}]
    config = tiny_config(tmp_path, max_steps=4, callbacks=callbacks)
    main(["fit", "--config", str(config)])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    main(["export", "--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "export")])
    assert "exported to" in capsys.readouterr().out
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "export")
    trained = torch.load(checkpoint, weights_only=True)["state_dict"]
    # Weights equal the checkpoint's, with the ablation mask baked into each masked layer.
    name = next(k for k in trained if k.endswith("channel_mask"))
    layer = name[len("model."): -len(".channel_mask")]
    want = trained[f"model.{layer}.weight"] * trained[name][:, None]
    torch.testing.assert_close(exported.state_dict()[f"{layer}.weight"], want, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "export" / "vlmc_export.json").read_text())
    assert manifest["checkpoint"] == str(checkpoint)
    # A second export to the same folder needs --overwrite.
    with pytest.raises(FileExistsError):
        main(["export", "--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "export")])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["export", "--config", str(config), "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out",
              str(tmp_path / "e2")])


def test_bench_verb_prints_throughput(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "bench.json"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # a timing run keeps nothing: no config.yaml where it runs
    results = main_bench(["--config", str(config), "--steps", "3", "--warmup", "1", "--new_tokens", "4",
                          "--repeats", "1", "--out", str(out)])
    # The run folder is tmp_path, where the input config.yaml lies: a saved config would be resolved_config.yaml.
    assert not (workdir / "config.yaml").exists() and not (tmp_path / "resolved_config.yaml").exists()
    printed = capsys.readouterr().out
    assert "tokens_per_s" in printed and "generate_tokens_per_s" in printed
    saved = json.loads(out.read_text())
    assert saved["steps_per_s"] > 0 and saved["tokens_per_s"] > 0 and saved["tflops_per_s"] > 0
    assert saved["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert results["device"] == "cpu"


def test_device_profile_counts_each_kernel_once() -> None:
    """A CUDA profile lists operators (with their kernels' time), the kernels again, and annotations spanning them."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from framework.bench import summarise_profile

    def event(key: str, device_us: float, device: DeviceType, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(key=key, count=1, self_device_time_total=device_us, self_cpu_time_total=5.0,
                               device_type=device, is_user_annotation=annotation)

    events = [event("Optimizer.step#AdamW.step", 900.0, DeviceType.CUDA, annotation=True),
              event("Optimizer.step#AdamW.step", 0.0, DeviceType.CPU, annotation=True),
              event("aten::mm", 300.0, DeviceType.CPU), event("aten::mul", 100.0, DeviceType.CPU),
              event("sm90_gemm_kernel", 300.0, DeviceType.CUDA), event("elementwise_kernel", 100.0, DeviceType.CUDA)]
    profile = summarise_profile(events, on_device=True, steps=1, wall_s=0.001)
    assert profile["device_busy_share"] == pytest.approx(0.4)  # 400 us of kernels in 1 ms
    assert profile["matmul_share"] == pytest.approx(0.75)
    assert [(row["op"], row["share"]) for row in profile["top_ops"]] == [("aten::mm", 0.75), ("aten::mul", 0.25)]
    # The host's side: operators' own CPU time (5 us each here) against the wall time, kernels not counted.
    assert profile["host_ops_share"] == pytest.approx(0.01)
    assert {row["op"] for row in profile["host_top_ops"]} == {"aten::mm", "aten::mul"}
    assert all(row["share_of_wall"] == pytest.approx(0.005) for row in profile["host_top_ops"])


def test_bench_profile_reports_where_the_step_goes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = main_bench(["--config", str(tiny_config(tmp_path)), "--steps", "2", "--warmup", "1", "--profile", "2",
                          "--new_tokens", "2", "--repeats", "1"])
    profile = results["profile"]
    assert profile["profiled_steps"] == 2 and profile["wall_s"] > 0
    assert profile["device_busy_share"] is None  # measured on CUDA only
    assert 0.0 < profile["matmul_share"] < 1.0
    ops = [row["op"] for row in profile["top_ops"]]
    assert len(ops) == 15 and any(op.startswith(("aten::mm", "aten::addmm", "aten::bmm")) for op in ops)
    assert sum(row["share"] for row in profile["top_ops"]) <= 1.0 + 1e-9
    assert "matmul share" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--profile, --loader and --loader_workers >= 0"):
        main_bench(["--config", str(tiny_config(tmp_path, name="p.yaml")), "--profile", "-1"])


def test_bench_times_the_loader_in_process(tmp_path: Path) -> None:
    results = main_bench(["--config", str(tiny_config(tmp_path)), "--steps", "2", "--warmup", "1", "--new_tokens", "2",
                          "--repeats", "1", "--loader", "3"])
    assert results["loader_batch_ms"] > 0 and results["loader_samples_per_s_per_worker"] > 0
    assert results["loader_batch_ms_processor"] > 0  # the same batches through the HF image processor
    # Workers needed = step rate x seconds per batch.
    assert results["loader_workers_needed"] == pytest.approx(results["steps_per_s"] * results["loader_batch_ms"] / 1e3)
    with pytest.raises(SystemExit, match="--loader and --loader_workers >= 0"):
        main_bench(["--config", str(tiny_config(tmp_path, name="l.yaml")), "--loader", "-1"])


def test_bench_times_the_loader_with_worker_processes(tmp_path: Path) -> None:
    results = main_bench(["--config", str(tiny_config(tmp_path)), "--steps", "1", "--warmup", "0", "--new_tokens", "1",
                          "--repeats", "1", "--loader", "3", "--loader_workers", "1"])
    assert results["loader_workers"] == 1 and results["loader_steps_per_s_bound"] > 0
    # Both pixel hand-overs, side by side; the configured one (levels, by default) is the bound.
    assert results["loader_steps_per_s_bound"] == results["loader_steps_per_s_bound_pixel_levels"]
    assert results["loader_steps_per_s_bound_float_pixels"] > 0
    with pytest.raises(SystemExit, match="--loader_workers K needs --loader N"):
        main_bench(["--config", str(tiny_config(tmp_path, name="w.yaml")), "--loader_workers", "2"])


def test_bench_measures_plugin_overhead_side_by_side(tmp_path: Path) -> None:
    ablation = {"class_path": "plugins.channel_ablation.ChannelAblation", "init_args": {"fraction": 0.5}}
    config = tiny_config(tmp_path, callbacks=[ablation])
    results = main_bench(["--config", str(config), "--steps", "3", "--warmup", "1", "--new_tokens", "2",
                          "--repeats", "1", "--without_plugins"])
    assert results["plugins"] == "ChannelAblation"
    assert results["step_s_with_plugins"] > 0 and results["step_s_without_plugins"] > 0
    assert results["plugin_overhead"] == pytest.approx(results["step_s_with_plugins"]
                                                       / results["step_s_without_plugins"])
    with pytest.raises(SystemExit, match="no compression plugins"):
        main_bench(["--config", str(tiny_config(tmp_path, name="plain.yaml")), "--steps", "1", "--warmup", "0",
                    "--without_plugins"])


def main_bench(argv: list[str]) -> dict:
    from framework.bench import main as bench

    return bench(argv)


@pytest.mark.parametrize(("trainer", "expected"), [
    ({"devices": 2}, {"find_unused_parameters": True}),  # task-homogeneous batches leave parameters unused
    ({"devices": 2, "strategy": "ddp"}, {}),             # an explicit strategy is kept
    ({"devices": 1}, None),
])
def test_several_devices_get_ddp_that_tolerates_unused_parameters(tmp_path: Path, trainer: dict,
                                                                   expected: dict | None) -> None:
    cli = build(["--config", str(tiny_config(tmp_path, accelerator="cpu", logger=False, **trainer))], run=False)
    assert getattr(cli.trainer.strategy, "_ddp_kwargs", None) == expected


def test_peak_flops_knows_the_h200(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's table has no H200 (the H100 SXM's tensor cores): MFU would be missing on it."""
    from framework.bench import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0), "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None


def test_plain_loop_clips_like_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bare loop `vlmc bench --plain` compares with does what the run's trainer does: it clips when told to."""
    from helpers import make_cli

    from framework.bench import plain_loop_step_time

    cli = make_cli(tiny_config(tmp_path, max_steps=1, gradient_clip_val=0.5, limit_val_batches=0,
                               val_check_interval=None))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # wires the data module to the model's processor
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: calls.append(max_norm) or original(params, max_norm, **kw))
    assert plain_loop_step_time(cli.model, cli.datamodule.train_dataloader(), 2, 1, "32-true",
                                clip=cli.trainer.gradient_clip_val) > 0
    assert calls == [0.5] * 3
    calls.clear()
    plain_loop_step_time(cli.model, cli.datamodule.train_dataloader(), 1, 0, "32-true")
    assert not calls
