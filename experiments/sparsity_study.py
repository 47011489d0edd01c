"""The sparsity study of experiments/results/sparsity: every run, in dependency order, several at a time on one GPU.

1. ``kernels``: 2:4 kernel speed for the GPU base's linear shapes and large shapes (GPU idle, run first).
2. ``base``: pretrain the dense GPU base (experiments/pretrain/gpu_base.yaml) and export it as an HF folder.
   Beside it, from scratch, a model of the 50%-pruned shape trained with the same total compute as base + L0
   (and, in the sweep, one with the L0 run's compute alone).
3. ``sweep``: from the dense base, fine-tunes with the sparsity ramp (50/65/70/75/90% unstructured, 2:4, 4:8) and a
   dense fine-tune of the same length; one-shot magnitude and activation-aware pruning at the same settings
   (validated without retraining); L0 structured pruning to 50% and 90% of the text tower, improved and plain, with
   a dense fine-tune as long as the L0 runs (``dense_finetune_l0``) as their reference, and improved L0 with 20% or
   half of the run on exact masks instead of the default 80% (``l0_50_improved_hard20``, ``_hard50``,
   ``l0_90_improved_hard20``), and improved L0 at 50% distilled from the dense base or from its dense reference
   (``l0_50_improved_distill``, ``l0_50_improved_distill_ft``) or with one kind of unit kept whole
   (``l0_50_improved_keep_hidden``, ``_keep_heads``, ``_keep_layers``); the 50%, 75% and 2:4 ramps again with
   distillation from the dense base (``ramp50_distill``, ``ramp75_distill``, ``ramp2of4_distill``) and, once the
   sweep's other runs are done, from the dense fine-tune, the ramps' reference (``ramp50_distill_ft``, ...).
   ``--run_tag T`` ends the names of the runs as long as ``--l0_steps`` in ``_T`` (``l0_50_improved_3000steps``);
   ``--ft_tag T`` those of the runs as long as ``--ft_steps``: the dense fine-tune, the ramps and their distilled
   variants (``ramp75_1000steps``).
4. ``latency`` of the exported pruned models against the dense base, and ``overhead`` of each plugin in training
   (``vlmc bench --without_plugins``), both with the GPU otherwise idle.
   ``scratch`` alone runs only the from-scratch model of the 50%-pruned shape with the L0 run's compute (the
   sweep's ``l0_scratch50_l0compute``), which needs no base.
5. ``collect``: every run's summary into ``accuracy.csv`` (read by notebooks/sparsity_accuracy.ipynb).

    python experiments/sparsity_study.py --out experiments/results/sparsity            # on one CUDA GPU
    python experiments/sparsity_study.py --out /tmp/smoke --smoke                       # wiring check on a CPU
    python experiments/sparsity_study.py --base_steps 3600 --base_args "--config experiments/pretrain/gpu_reading.yaml"
        # the base that reads its cards (glyph supervision, CUDA graphs); fine-tunes stay plain

Each run's log, summary and export land under ``--work``; summaries, tables and benchmark JSONs under ``--out``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "experiments" / "pretrain" / "gpu_base.yaml"
BASE_SPEC = ROOT / "experiments" / "models" / "llava-base-gpu.json"
RAMPS = {"ramp50": {"final_sparsity": 0.5}, "ramp65": {"final_sparsity": 0.65}, "ramp70": {"final_sparsity": 0.7},
         "ramp75": {"final_sparsity": 0.75}, "ramp90": {"final_sparsity": 0.9},
         "ramp2of4": {"pattern": "2:4"}, "ramp4of8": {"pattern": "4:8"}}
LANGUAGE_MODEL = {"include": "language_model", "exclude": "lm_head"}
#: The runs ``--seeds`` repeats: the goals' gaps (the 50%, 75% and 2:4 ramps, also distilled from the dense
#: fine-tune, and L0 at 50%, also with every layer kept) and their dense references. "No loss" at 50% is a claim
#: about a mean over seeds: one seed's 256 samples per task move F1 by about a point.
SEEDED = ("dense_finetune", "ramp50", "ramp75", "ramp2of4", "ramp50_distill_ft", "ramp75_distill_ft",
          "ramp2of4_distill_ft", "l0_50_improved", "l0_50_improved_keep_layers", "dense_finetune_l0")
L0 = "plugins.l0_pruning.L0Pruning"


@dataclass
class Job:
    name: str
    verb: str
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    export_to: Path | None = None
    gpu: int | None = None
    after: str | None = None  # a job of the same stage whose export this one needs: it runs in a second round


def seed_replica(job: Job, seed: int) -> Job:
    """``job`` again as ``<name>_seed<seed>``, not exported: model and data seed both set (data order and validation
    samples), and L0's gate noise too. It waits for what ``job`` waits for (a teacher's export: teachers stay the
    seed-0 models)."""
    callbacks = [{**c, "init_args": {**c["init_args"], "seed": seed}} if c["class_path"] == L0 else c
                 for c in job.callbacks]
    return Job(f"{job.name}_seed{seed}", job.verb, callbacks,
               [*job.overrides, f"--seed_everything={seed}", f"--data.init_args.seed={seed}"], after=job.after)


def split_configs(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` as (its ``--config`` files, each with its flag and made absolute; everything else), in their order.

    Absolute, because a run starts in a folder of its own, where a path relative to where the study was started
    would not be found."""
    configs, rest, take_next = [], [], False
    for arg in args:
        if take_next:
            configs.append(str(Path(arg).resolve()))
            take_next = False
        elif arg.startswith("--config="):
            configs.append("--config=" + str(Path(arg.split("=", 1)[1]).resolve()))
        elif arg == "--config":
            configs.append(arg)
            take_next = True
        else:
            rest.append(arg)
    return configs, rest


def callback(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


def run_threads(parallel: int, cores: int | None = None) -> int:
    """CPU threads for each of ``parallel`` concurrent runs: the cores shared out, 1 to 8 each."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores // max(1, parallel + 1)))


class Study:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.out = Path(opts.out).resolve()
        self.work = Path(opts.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.base_export = self.work / "exports" / "dense_base"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    # Runs share one GPU: let each give back what it frees instead of fragmenting.
                    "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
                    "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
                    # Each run's main process would otherwise start one CPU thread per core: with several runs on
                    # one host the spinning thread pools starved the GPUs (load 195 on 64 cores, GPUs mostly idle).
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(run_threads(opts.parallel))),
                    # Runs start in their own folders: a checkout that is not pip-installed must still import.
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self._gpu_lock = threading.Lock()
        self._gpu_load: dict[int, int] = {}

    # ------------------------------------------------------------------ GPUs
    def gpu_ids(self) -> list[int]:
        return list(self.opts.gpu_ids) if getattr(self.opts, "gpu_ids", None) else list(range(self.opts.gpus))

    def reserved_gpus(self) -> set[int]:
        """GPUs another workload holds for now: the integers in ``--reserved_gpus`` (a file), while it exists."""
        path = getattr(self.opts, "reserved_gpus", None)
        try:
            return {int(word) for word in Path(path).read_text().split()} if path else set()
        except (FileNotFoundError, ValueError):
            return set()

    def acquire_gpu(self, job: Job) -> int | None:
        """The GPU ``job`` runs on: its pinned one, else the least busy free one (waits while all are reserved)."""
        ids = self.gpu_ids()
        if len(ids) < 2 and not getattr(self.opts, "gpu_ids", None):
            return None  # one GPU, not named: the run uses the default device
        while True:
            with self._gpu_lock:
                if job.gpu is not None:
                    gpu = ids[job.gpu % len(ids)]
                else:
                    free = [g for g in ids if g not in self.reserved_gpus()]
                    gpu = min(free, key=lambda g: (self._gpu_load.get(g, 0), ids.index(g))) if free else None
                if gpu is not None:
                    self._gpu_load[gpu] = self._gpu_load.get(gpu, 0) + 1
                    return gpu
            time.sleep(5)

    def release_gpu(self, gpu: int | None) -> None:
        if gpu is not None:
            with self._gpu_lock:
                self._gpu_load[gpu] -= 1

    # ------------------------------------------------------------------ running one job
    def common(self) -> list[str]:
        o = self.opts
        args = ["--config", str(Path(o.base_config).resolve()),
                "--config", str(ROOT / "experiments" / "csv_logger.yaml"),
                f"--data.init_args.num_workers={o.workers}", "--trainer.enable_progress_bar=false"]
        if o.smoke:
            args += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.init_args.batch_size=4",
                     "--data.init_args.val_batch_size=4", "--data.init_args.image_size=64",
                     "--data.init_args.val_samples=4", "--data.init_args.max_length=128",
                     "--model.init_args.max_new_tokens=8"]
        return args

    def summarised(self, name: str) -> bool:
        """Whether run ``name`` already has its summary (and is therefore skipped, unless ``--rerun``)."""
        return (self.out / f"summary_{name}.json").exists() and not self.opts.rerun

    def run(self, job: Job) -> int:
        log = self.work / "logs" / f"{job.name}.log"
        if self.summarised(job.name):
            print(f"[skip] {job.name}: summary exists", flush=True)
            return 0
        config = self.work / "configs" / f"{job.name}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": job.callbacks}}))
        ckpt_dir = self.work / "ckpt" / job.name
        argv = [sys.executable, "-m", "framework.cli", job.verb, *self.common(), "--config", str(config),
                *job.overrides, f"--report.filename={self.out / f'summary_{job.name}.json'}"]
        if job.verb == "fit":
            argv += [f"--checkpoint.dirpath={ckpt_dir}"]
        start = time.time()
        env = dict(self.env)
        gpu = self.acquire_gpu(job)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        try:
            print(f"[start] {job.name} (gpu {env.get('CUDA_VISIBLE_DEVICES', 'default')})", flush=True)
            log.write_text(shlex.join(argv[1:]) + "\n")
            # One working folder per run: loggers number their versions per folder, and runs start concurrently.
            cwd = self.work / "runs" / job.name
            cwd.mkdir(parents=True, exist_ok=True)
            with log.open("a") as handle:
                code = subprocess.call(argv, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            if code == 0 and job.export_to is not None:
                export = [sys.executable, "-m", "framework.cli", "export", *self.common(), "--config", str(config),
                          *job.overrides, "--ckpt_path", str(ckpt_dir / "last.ckpt"), "--out", str(job.export_to),
                          "--overwrite", "true"]
                with log.open("a") as handle:
                    code = subprocess.call(export, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        finally:
            self.release_gpu(gpu)
        print(f"[{'done' if code == 0 else f'FAILED rc={code}'}] {job.name} in {time.time() - start:.0f} s "
              f"(log {log})", flush=True)
        return code

    def run_all(self, jobs: list[Job], parallel: int) -> dict[str, int]:
        """Runs ``jobs``, each on the least busy unreserved GPU when it starts (see acquire_gpu); jobs with an
        ``after`` run in a second round, once the job they need has finished (and only if it succeeded)."""
        first = [j for j in jobs if j.after is None]
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            codes = dict(zip([j.name for j in first], pool.map(self.run, first)))
        second = []
        for job in jobs:
            if job.after is None:
                continue
            needed = next((j for j in jobs if j.name == job.after), None)
            missing = needed is not None and (codes.get(needed.name, 0) != 0 or (
                needed.export_to is not None and not (needed.export_to / "config.json").exists()))
            if missing and not self.summarised(job.name):
                print(f"[skip] {job.name}: {job.after} failed or left no export", flush=True)
                codes[job.name] = 1
            else:
                second.append(job)
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            codes.update(zip([j.name for j in second], pool.map(self.run, second)))
        return codes

    def python(self, name: str, args: list[str], cwd: Path = ROOT) -> int:
        """``python <args>`` in ``cwd``, logged to ``<work>/logs/<name>.log``; returns the exit code."""
        log = self.work / "logs" / f"{name}.log"
        print(f"[start] {name}", flush=True)
        with log.open("w") as handle:
            code = subprocess.call([sys.executable, *args], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   env=self.env)
        print(f"[{'done' if code == 0 else f'FAILED rc={code}'}] {name}", flush=True)
        return code

    # ------------------------------------------------------------------ the study's runs
    @property
    def epoch_batches(self) -> int:
        """Batches in an epoch of the base config's data module (1000, the data module's default, where unset)."""
        config = yaml.safe_load(Path(self.opts.base_config).read_text()) or {}
        return int(((config.get("data") or {}).get("init_args") or {}).get("batches_per_epoch", 1000))

    def steps(self, n: int) -> list[str]:
        # Validation every half run, at most once an epoch of the data module (Lightning counts the interval within
        # an epoch, and refuses one longer than the epoch).
        every = max(1, min(n // 2, self.epoch_batches))
        return [f"--trainer.max_steps={n}", f"--trainer.val_check_interval={every}",
                f"--checkpoint.every_n_train_steps={every}"]

    def from_base(self, steps: int, lr: float) -> list[str]:
        return [f"--model.init_args.model={self.base_export}", f"--model.init_args.lr={lr}",
                f"--data.init_args.batch_size={self.opts.ft_batch}", *self.steps(steps)]

    def base_job(self) -> Job:
        o = self.opts
        # Config files of --base_args first, so --base_steps and --base_workers are not silently undone by a recipe
        # file's own max_steps and num_workers; its other arguments last, so they win over everything.
        configs, extra = split_configs(shlex.split(o.base_args))
        overrides = [*configs, *self.steps(o.base_steps)]
        if o.smoke:
            overrides.append(f"--model.init_args.model={ROOT / 'experiments/models/llava-test.json'}")
        overrides.append(f"--data.init_args.num_workers={max(self.opts.workers, self.opts.base_workers if not o.smoke else 0)}")
        overrides += extra
        return Job("dense_base", "fit", overrides=overrides, export_to=self.base_export, gpu=0)

    def scratch_job(self, spec: Path, *, with_base: bool = True) -> Job:
        """The pruned shape from scratch with the training compute (6·N·tokens rule) of the base and the L0 run
        (``l0_scratch50``), or of the L0 run alone (``l0_scratch50_l0compute``: the base taken as given, as
        Sheared-LLaMA counts)."""
        o = self.opts
        dense, small = non_embedding_params(BASE_SPEC if not o.smoke else None), non_embedding_params(spec)
        batch = 256 if not o.smoke else 4
        compute = (o.base_steps * batch if with_base else 0) + o.l0_steps * o.ft_batch
        steps = max(1, int(round(compute * dense / small / batch)))
        # Trained like the base: its recipe's config files (--base_args, e.g. the reading recipe's glyph supervision),
        # at the pruned shape, for the steps of the compute.
        configs, _ = split_configs(shlex.split(o.base_args))
        overrides = [*configs, f"--model.init_args.model={spec}", *self.steps(steps)]
        if not with_base:  # a sweep-sized run, placed like the sweep's
            return Job(f"l0_scratch50_l0compute{self.run_tag}", "fit", overrides=overrides)
        # On the second GPU when there is one; the sweep's first jobs go to the others.
        workers = f"--data.init_args.num_workers={max(o.workers, o.base_workers // 2 if not o.smoke else 0)}"
        return Job("l0_scratch50", "fit", overrides=[*overrides, workers], gpu=1)

    @property
    def scratch_spec(self) -> Path:
        """The 50%-pruned shape (written by the ``base`` and ``scratch`` stages)."""
        return self.work / "llava-base-gpu-l0-50.json"

    def write_scratch_spec(self) -> Path:
        """The 50%-pruned shape of the base spec, as the L0 runs' exports get it (``plugins.l0_pruning.spec``)."""
        base = BASE_SPEC if not self.opts.smoke else ROOT / "experiments/models/llava-test.json"
        self.scratch_spec.parent.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([sys.executable, "-m", "plugins.l0_pruning.spec", "--base", str(base), "--fraction", "0.5",
                               "--multiple_of", str(self.multiple_of), "--out", str(self.scratch_spec)], cwd=ROOT)
        return self.scratch_spec

    def feature_layers(self) -> list[int]:
        """Hidden states that layer-wise distillation compares: after a third and two thirds of the base's text
        layers, and the last (``[-1]`` alone when the base's config does not say how many layers it has)."""
        try:
            config = json.loads((self.base_export / "config.json").read_text())
            layers = int(config.get("text_config", config)["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            return [-1]
        return sorted({layers // 3, 2 * layers // 3} - {0}) + [-1]

    @property
    def run_tag(self) -> str:
        """``_<--run_tag>``, or nothing: ends the names of the runs the tag marks, so runs of two lengths share a work
        folder (here the runs as long as ``--l0_steps``: the L0 runs, their dense reference and the from-scratch shape
        with their compute; the quantization study's float fine-tune and stacked runs)."""
        return self._suffix("run_tag")

    @property
    def ft_tag(self) -> str:
        """``_<--ft_tag>``, or nothing: ends the names of the runs as long as ``--ft_steps`` (the dense fine-tune, the
        ramps and their distilled variants), so fine-tunes of two lengths share a work and a results folder."""
        return self._suffix("ft_tag")

    def _suffix(self, option: str) -> str:
        """``_<value of the tag option>``, or nothing when it is unset (studies without the option have none)."""
        tag = getattr(self.opts, option, "")
        return f"_{tag}" if tag else ""

    def untagged(self, name: str) -> str:
        """``name`` without the tag of its kind of run."""
        return name.removesuffix(self.run_tag).removesuffix(self.ft_tag)

    def sweep_jobs(self) -> list[Job]:
        """The fine-tunes, longest first so the pool's last runs are short ones."""
        o = self.opts
        tag, ft_tag, exports = self.run_tag, self.ft_tag, self.work / "exports"
        ramp = dict(schedule="cubic", start=0.0, end=0.7, update_every=max(1, o.ft_steps // 50), targets=LANGUAGE_MODEL)
        jobs = []
        for l0_name, fraction, method in (("l0_50_improved", 0.5, "improved"), ("l0_50_plain", 0.5, "plain"),
                                          ("l0_90_improved", 0.9, "improved"), ("l0_90_plain", 0.9, "plain")):
            jobs.append(Job(l0_name + tag, "fit", [callback(L0, target_fraction=fraction,
                                                            method=method, multiple_of=self.multiple_of)],
                            self.from_base(o.l0_steps, o.ft_lr), export_to=exports / (l0_name + tag)))
        # Ablation of the exact-mask recovery share (the default, 0.8, against 0.2 and 0.5): at 50% of the GPU base
        # it is worth 4 F1 points (experiments/results/sparsity/README.md); 90% shows whether that holds there.
        for fraction, hard_from in ((0.5, 0.2), (0.5, 0.5), (0.9, 0.2)):
            name = f"l0_{round(fraction * 100)}_improved_hard{round(hard_from * 100)}{tag}"
            jobs.append(Job(name, "fit", [callback(L0, target_fraction=fraction,
                                                   method="improved", multiple_of=self.multiple_of,
                                                   hard_from=hard_from)],
                            self.from_base(o.l0_steps, o.ft_lr), export_to=exports / name))
        # One kind of unit kept whole while the others pay for the 50%, to find what the reading needs. On the base
        # that reads the pruned model loses on the digits: they pass through the projector into the full hidden
        # width (keep_hidden), copying them from the image tokens is attention's work (keep_heads: the default run
        # keeps 6 of 8 query heads), and the default run drops 3 of 12 layers (keep_layers).
        for kept in ("hidden", "heads", "layers"):
            name = f"l0_50_improved_keep_{kept}{tag}"
            jobs.append(Job(name, "fit", [callback(L0, target_fraction=0.5, method="improved",
                                                   multiple_of=self.multiple_of, **{f"prune_{kept}": False})],
                            self.from_base(o.l0_steps, o.ft_lr), export_to=exports / name))
        dense_finetune_l0 = exports / f"dense_finetune_l0{tag}"
        if o.l0_steps != o.ft_steps:  # the L0 runs' dense reference: fine-tuned as long as they are
            jobs.append(Job(dense_finetune_l0.name, "fit", overrides=self.from_base(o.l0_steps, o.ft_lr),
                            export_to=dense_finetune_l0))
        # Improved L0 at 50% recovering toward a dense teacher (distillation on the answers): the base, or the dense
        # reference of the L0 runs once it is exported (the dense fine-tune when both have the same length).
        dense_finetune = exports / f"dense_finetune{ft_tag}"
        l0_teacher = dense_finetune_l0 if o.l0_steps != o.ft_steps else dense_finetune
        for suffix, teacher_path, after in (("_distill", self.base_export, None),
                                            ("_distill_ft", l0_teacher, l0_teacher.name)):
            jobs.append(Job(f"l0_50_improved{suffix}{tag}", "fit",
                            [callback(L0, target_fraction=0.5, method="improved",
                                      multiple_of=self.multiple_of),
                             callback("plugins.distillation.Distillation", teacher=str(teacher_path), weight=1.0,
                                      temperature=2.0)],
                            self.from_base(o.l0_steps, o.ft_lr),
                            export_to=exports / f"l0_50_improved{suffix}{tag}", after=after))
        # The same with layer-wise distillation as well (CoFi pairs it with structured pruning): the hidden states
        # after a third and two thirds of the text tower's layers and the last, against the dense reference's.
        # Pruned hidden dims are zero in the student, a constant part of the error once the masks are exact.
        jobs.append(Job(f"l0_50_improved_distill_ft_features{tag}", "fit",
                        [callback(L0, target_fraction=0.5, method="improved",
                                  multiple_of=self.multiple_of),
                         callback("plugins.distillation.Distillation", teacher=str(l0_teacher), weight=1.0,
                                  temperature=2.0, feature_weight=1.0, feature_layers=self.feature_layers())],
                        self.from_base(o.l0_steps, o.ft_lr),
                        export_to=exports / f"l0_50_improved_distill_ft_features{tag}", after=l0_teacher.name))
        jobs.append(Job(dense_finetune.name, "fit", overrides=self.from_base(o.ft_steps, o.ft_lr),
                        export_to=dense_finetune))
        for name, args in RAMPS.items():
            jobs.append(Job(name + ft_tag, "fit", [callback("plugins.sparsity.SparsityRamp", **ramp, **args)],
                            self.from_base(o.ft_steps, o.ft_lr), export_to=exports / (name + ft_tag)))
        # The ramps where captions lag most, recovering toward the dense base too (distillation on the answers).
        teacher = callback("plugins.distillation.Distillation", teacher=str(self.base_export), weight=1.0,
                           temperature=2.0)
        # The base is the weaker teacher (500 more steps make the dense reference 7 F1 points better on the GPU
        # base), so the same ramps also learn from that reference, which exists once dense_finetune is exported.
        finetuned = callback("plugins.distillation.Distillation", teacher=str(dense_finetune), weight=1.0,
                             temperature=2.0)
        for name in ("ramp50", "ramp75", "ramp2of4"):
            for suffix, distill, after in (("_distill", teacher, None), ("_distill_ft", finetuned, dense_finetune.name)):
                jobs.append(Job(f"{name}{suffix}{ft_tag}", "fit",
                                [callback("plugins.sparsity.SparsityRamp", **ramp, **RAMPS[name]), distill],
                                self.from_base(o.ft_steps, o.ft_lr), export_to=exports / f"{name}{suffix}{ft_tag}",
                                after=after))
        # Seed replicas of the goals' runs, so a ramp and its dense reference of one seed are paired on the same samples.
        for seed in o.seeds:
            jobs += [seed_replica(job, seed) for job in jobs if self.untagged(job.name) in SEEDED]
        return jobs

    def oneshot_jobs(self) -> list[Job]:
        jobs = [Job("dense", "validate", overrides=[f"--model.init_args.model={self.base_export}"])]
        for method, short in (("magnitude", "mag"), ("activation", "act")):
            for name, args in RAMPS.items():
                setting = {"sparsity": args["final_sparsity"]} if "final_sparsity" in args else {"pattern": args["pattern"]}
                jobs.append(Job(f"oneshot_{short}_{name.removeprefix('ramp')}", "validate",
                                [callback("plugins.sparsity.OneShotPruning", method=method, targets=LANGUAGE_MODEL,
                                          **setting)],
                                [f"--model.init_args.model={self.base_export}",
                                 f"--data.init_args.batch_size={self.opts.ft_batch}"]))
        return jobs

    @property
    def multiple_of(self) -> int:
        """Pruned widths rounded for the GPU's tensor cores (1 for the tiny smoke model)."""
        return 1 if self.opts.smoke else 8

    def kernels(self) -> int:
        if self.opts.smoke:
            return 0
        return self.python("kernels", ["-m", "plugins.sparsity.bench", "--model", str(BASE_SPEC),
                                       "--out", str(self.out / "bench_sparse24.json")])

    def latency(self) -> int:
        """Forward latency of each exported pruned model against the dense base, GPU otherwise idle, bf16."""
        import torch
        from transformers import AutoModelForImageTextToText

        from plugins.l0_pruning.latency import compare_latency

        pruned = [p for p in sorted((self.work / "exports").glob("l0_*")) if (p / "config.json").exists()]
        if not pruned:
            return 0
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        shapes = [(1, 128), (32, 160), (256, 160)] if not self.opts.smoke else [(1, 16)]
        dense = AutoModelForImageTextToText.from_pretrained(self.base_export)
        rows = []
        for folder in pruned:
            model = AutoModelForImageTextToText.from_pretrained(folder)
            for batch, seq in shapes:
                result = compare_latency(dense, model, batch_size=batch, seq_len=seq, device=device, dtype=dtype)
                rows.append({"run": folder.name, "batch": batch, "seq": seq, "dense_ms": result["dense"]["median_ms"],
                             "pruned_ms": result["pruned"]["median_ms"], "speedup": result["speedup"],
                             "dense_params": result["dense"]["params"], "pruned_params": result["pruned"]["params"]})
                print(rows[-1], flush=True)
            del model
        device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        (self.out / "latency_pruned.json").write_text(json.dumps({"device": device_name, "dtype": str(dtype),
                                                                  "rows": rows}, indent=2))
        return 0

    def overhead(self) -> int:
        o = self.opts
        ramp = callback("plugins.sparsity.SparsityRamp", final_sparsity=0.75, start=0.0, end=1.0, update_every=10,
                        targets=LANGUAGE_MODEL)
        l0 = callback(L0, target_fraction=0.5, method="improved")
        code = 0
        for name, cb in (("ramp75", ramp), ("l0_50_improved", l0)):
            config = self.work / "configs" / f"overhead_{name}.yaml"
            config.write_text(yaml.safe_dump({"trainer": {"callbacks": [cb]}}))
            steps = ["--steps", "3", "--warmup", "1"] if o.smoke else ["--steps", "40", "--warmup", "20"]
            code |= self.python(f"overhead_{name}", [
                "-m", "framework.cli", "bench", *self.common(), "--config", str(config),
                f"--model.init_args.model={self.base_export}", f"--data.init_args.batch_size={o.ft_batch}",
                *steps, "--new_tokens", "4", "--repeats", "1", "--without_plugins",
                "--out", str(self.out / f"overhead_{name}.json")])
        return code

    def collect(self) -> None:
        from framework.sweep import collect, to_csv

        rows = collect([self.out])
        (self.out / "accuracy.csv").write_text(to_csv(rows))
        print(f"{len(rows)} runs in {self.out / 'accuracy.csv'}", flush=True)

    def finish(self, codes: dict[str, int]) -> dict[str, int]:
        """Collect the table, record which runs failed, write the archive; runs even after a failed stage.
        Returns the failed runs' exit codes."""
        opts = self.opts
        if "collect" in opts.stages:
            try:
                self.collect()
            except (FileNotFoundError, ValueError) as err:  # keep the run's own error visible
                print(f"collect: {err}", flush=True)
        if codes:  # runs or stages ran: a `collect` alone over a results folder leaves nothing beside its table
            record_status(self.out / "study_status.json", codes, sys.argv[1:])
        if opts.pack:
            self.pack(Path(opts.pack))
        failed = {k: v for k, v in codes.items() if v}
        print("all runs finished" if not failed else f"failed: {failed}", flush=True)
        return failed

    def pack(self, target: Path) -> None:
        """Logs, summaries and benchmark JSONs (not checkpoints or exports) in one archive."""
        with tarfile.open(target, "w:gz") as tar:
            tar.add(self.out, arcname="out")
            tar.add(self.work / "logs", arcname="logs")
            for path in (self.work / "exports").glob("*/vlmc_export.json"):
                tar.add(path, arcname=f"exports/{path.parent.name}/vlmc_export.json")
            for path in (self.work / "exports").glob("*/*.json"):
                if path.name.endswith(("bpv.json", "l0_pruning.json", "config.json")):
                    tar.add(path, arcname=f"exports/{path.parent.name}/{path.name}")


def non_embedding_params(spec: Path | None) -> int:
    """Parameters that cost compute per token (everything but embeddings and LM head), of a spec JSON."""
    from framework.models import load_vlm

    model = load_vlm(str(spec or ROOT / "experiments/models/llava-test.json")).model
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def record_status(path: Path, codes: dict[str, int], argv: list[str]) -> None:
    """Merge one invocation's exit codes into ``path`` (``codes``: the latest code of every run; ``invocations``:
    each invocation's arguments and codes). Studies started side by side on one --out (a sweep beside the L0 runs)
    each keep theirs: the read-merge-write is locked and the file replaced atomically."""
    from framework.io import atomic_write_json

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            status = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            status = {}
        merged = {**status.get("codes", {}), **codes}
        invocations = [*status.get("invocations", []), {"argv": argv, "codes": codes}]
        atomic_write_json(path, {"codes": merged, "invocations": invocations})


def add_shared_arguments(parser: argparse.ArgumentParser, *, out: str, work: str) -> None:
    """The options every study shares: where results go, the base, and how runs share the machine."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--work", default=work)
    parser.add_argument("--base_config", default=str(BASE_CONFIG),
                        help="the run config every job starts from (e.g. experiments/quickstart.yaml on a CPU)")
    parser.add_argument("--base_steps", type=int, default=2800)
    parser.add_argument("--base_args", default="",
                        help="more CLI arguments of the base pretraining run only, one string; its --config files "
                        "come before --base_steps/--base_workers (which win over them), its other arguments after "
                        "(e.g. its compile mode: "
                        "'--model.init_args.compile=true --model.init_args.compile_mode=reduce-overhead "
                        "--data.init_args.pad_to_max_length=true')")
    parser.add_argument("--ft_batch", type=int, default=128)
    # Each run at batch 128 holds 8-12 GB of GPU memory: eight plus the from-scratch baseline overflowed an 80 GB H100.
    parser.add_argument("--parallel", type=int, default=5, help="training runs sharing the GPU at once")
    parser.add_argument("--workers", type=int, default=2, help="data workers per run")
    parser.add_argument("--base_workers", type=int, default=10, help="data workers of the base pretraining run")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to spread runs over (default: all visible)")
    parser.add_argument("--gpu_ids", type=int, nargs="+", help="which GPUs to spread runs over (default: 0..gpus-1)")
    parser.add_argument("--reserved_gpus", help="a file listing GPU ids other work holds; new runs avoid them while "
                        "it exists (jobs pinned to a GPU ignore it)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps, CPU: checks the wiring")
    parser.add_argument("--rerun", action="store_true", help="run jobs whose summary already exists")
    parser.add_argument("--pack", help="also write logs and results into this .tar.gz at the end")


def resolve_gpus(opts: argparse.Namespace) -> None:
    if opts.gpus is None:
        import torch

        opts.gpus = max(1, torch.cuda.device_count())


def check_seeds(parser: argparse.ArgumentParser, flag: str, seeds: list[int]) -> None:
    """Replica seeds are distinct and >= 1: seed 0 is the runs' own (the configs' ``seed_everything``)."""
    if any(seed < 1 for seed in seeds) or len(set(seeds)) != len(seeds):
        parser.error(f"{flag}: distinct seeds >= 1 (0 is the runs' own seed), got {' '.join(map(str, seeds))}")


def check_run_tag(parser: argparse.ArgumentParser, tag: str, flag: str = "--run_tag") -> None:
    """A tag ends run names (and their folders): letters, digits, '.', '-' and '_' only."""
    if not re.fullmatch(r"[A-Za-z0-9.\-_]*", tag):
        parser.error(f"{flag}: letters, digits, '.', '-' and '_' only (it ends run names), got {tag!r}")


def split_seed(name: str) -> tuple[str, str]:
    """``name`` as (its run, its ``_seed<n>`` suffix or ``""``)."""
    run, sep, seed = name.rpartition("_seed")
    return (run, sep + seed) if sep and seed.isdigit() else (name, "")


def check_only(study: Study, only: list[str]) -> None:
    """Fails before any run starts when ``--only`` names a run the study does not have. A seed replica named there
    (``<run>_seed<n>``) asks for its seed, as ``--seeds n`` would. With ``--run_tag`` or ``--ft_tag``, a run's name
    without its tag names it too (``l0_50_improved`` for ``l0_50_improved_3000steps``, ``ramp75`` for
    ``ramp75_1000steps``; ``only`` is rewritten in place)."""
    tags = [tag for tag in (study.run_tag, study.ft_tag) if tag]
    tagged = ({job.name for job in study.sweep_jobs()} | {f"l0_scratch50_l0compute{study.run_tag}"}) if tags else set()
    for i, name in enumerate(only):
        run, seed = split_seed(name)
        for tag in tags:
            if run + tag in tagged:
                only[i] = run + tag + seed
                break
    for name in only:
        run, seed = split_seed(name)
        if study.untagged(run) in SEEDED and seed and int(seed[5:]) not in study.opts.seeds:
            study.opts.seeds.append(int(seed[5:]))
    known = {job.name for job in study.sweep_jobs() + study.oneshot_jobs()}
    known |= {"dense_base", "l0_scratch50", f"l0_scratch50_l0compute{study.run_tag}"}
    unknown = sorted(set(only) - known)
    if unknown:
        raise SystemExit(f"--only: no run named {', '.join(unknown)}; the runs are {', '.join(sorted(known))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", default=["kernels", "base", "sweep", "latency", "overhead", "collect"],
                        help="stages to run; `pack` alone only writes the --pack archive of what exists so far")
    add_shared_arguments(parser, out="experiments/results/sparsity", work="/tmp/vlmc_sparsity_study")
    parser.add_argument("--ft_steps", type=int, default=600)
    parser.add_argument("--l0_steps", type=int, default=1500)
    parser.add_argument("--ft_lr", type=float, default=2e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[],
                        help=f"more seeds of {', '.join(SEEDED)} (runs named <run>_seed<n>; model and data seed)")
    parser.add_argument("--run_tag", default="",
                        help="ends the names of the runs as long as --l0_steps (the L0 runs, their dense reference, "
                        "the from-scratch shape with their compute) in _<tag>, e.g. 3000steps, so runs of another "
                        "length never meet these runs' summaries or exports; --only takes their names with or "
                        "without it")
    parser.add_argument("--ft_tag", default="",
                        help="the same for the runs as long as --ft_steps (the dense fine-tune, the ramps and their "
                        "distilled variants), e.g. --ft_steps 1000 --ft_tag 1000steps: ramp75_1000steps beside the "
                        "400-step ramp75")
    parser.add_argument("--only", nargs="+", help="run only these jobs of the base and sweep stages (seed replicas "
                        "follow their run's name; the from-scratch baseline l0_scratch50 only when named)")
    opts = parser.parse_args(argv)
    check_seeds(parser, "--seeds", opts.seeds)
    check_run_tag(parser, opts.run_tag)
    check_run_tag(parser, opts.ft_tag, "--ft_tag")
    if opts.smoke:
        opts.base_steps, opts.ft_steps, opts.l0_steps, opts.ft_batch = 6, 4, 6, 4
    resolve_gpus(opts)
    study = Study(opts)
    if opts.only:
        check_only(study, opts.only)
    if opts.stages == ["pack"]:
        study.pack(Path(opts.pack))
        return
    codes: dict[str, int] = {}
    scratch = None
    try:
        if "kernels" in opts.stages:
            codes["kernels"] = study.kernels()
        if "base" in opts.stages:
            spec = study.write_scratch_spec()
            # The from-scratch baseline runs beside everything else; it is the longest run.
            if not opts.only or "l0_scratch50" in opts.only:
                scratch = ThreadPoolExecutor(max_workers=1).submit(study.run, study.scratch_job(spec))
            codes["dense_base"] = study.run(study.base_job())
        if "scratch" in opts.stages and "sweep" not in opts.stages:
            # The L0 run's compute alone, without the base or the sweep (the sweep includes it).
            scratch_job = study.scratch_job(study.write_scratch_spec(), with_base=False)
            codes[scratch_job.name] = study.run(scratch_job)
        if "sweep" in opts.stages:
            if not (study.base_export / "config.json").exists():
                raise SystemExit(f"sweep: no dense base at {study.base_export}; run the `base` stage first")
            jobs = study.sweep_jobs() + study.oneshot_jobs()
            if study.scratch_spec.exists():
                jobs.append(study.scratch_job(study.scratch_spec, with_base=False))
            if opts.only:
                jobs = [j for j in jobs if j.name in opts.only or j.name.rsplit("_seed", 1)[0] in opts.only]
            codes.update(study.run_all(jobs, opts.parallel))
        if scratch is not None:
            codes["l0_scratch50"] = scratch.result()
        if "latency" in opts.stages:
            codes["latency"] = study.latency()
        if "overhead" in opts.stages:
            codes["overhead"] = study.overhead()
    finally:
        failed = study.finish(codes)
    if failed:  # every stage ran as far as it could; the exit status still says that runs failed
        raise SystemExit(f"failed runs: {', '.join(sorted(failed))} (see study_status.json and their logs)")


if __name__ == "__main__":
    main()
