"""The quantization study of experiments/results/quantization: every run, in dependency order, several at a time
on one GPU. The machinery (jobs, shared arguments, parallel runs, ``--pack``) is experiments/sparsity_study.py's.

1. ``base``: pretrain the dense GPU base (experiments/pretrain/gpu_base.yaml, ``--base_steps``) and export it as an
   HF folder; skipped when ``--base_export`` names an existing export.
2. ``table`` (the talk's PTQ vs QAT table): W8A8, W4A8, W4A16 and W2A8, weights symmetric per output channel
   (``_ch``) or per group of 32 inputs (``_g32``), activations static per tensor (8-bit, or 16-bit for A16), the
   KV cache per token. PTQ rows (``ptq_w4a8_ch`` ...) calibrate and validate the base (``vlmc validate``); QAT rows
   (``qat_w4a8_ch`` ...) fine-tune the base for ``--qat_steps`` at ``--qat_lr`` and are exported (encodings,
   integer weights, ``qat_bpv.json``). Each summary carries ``top1_agreement`` (quantized vs float on the answer
   positions; QAT rows against ``float_finetune``, the base fine-tuned as long without quantization, so that
   agreement measures quantization and not the fine-tuning's own drift; PTQ rows against their own weights with
   quantizers off, which are the base's) and ``weight_bits``. With ``--shared_inputs`` the quantized runs share
   one input quantizer among q/k/v and among gate/up (one encoding per tensor, as a device quantizes it) and are
   named ``..._shared``.
3. ``qalft``, per task (autofill, caption; ``data.init_args.tasks`` restricted to the task):
   ``lora_float_<task>``: float LoRA on the float base, evaluated in float (the reference; with
   ``--lora_float_base float_finetune`` on the float fine-tune as long as the QAT run instead, ``lora_float_ft_<task>``,
   so it has had the same training as the quantized pipelines' base);
   ``lora_float_ptq_w4a8_<task>``: that adapter merged into the base, then PTQ W4A8 (float LoRA then PTQ);
   ``lora_qat_<task>`` / ``lora_qat_ptq_w4a8_<task>``: float LoRA on the QAT W4A8 model (its exported grid
   weights), merged, then PTQ W4A8 (the talk's "QAT + PTQ" pipeline);
   ``qalft_<task>``: QALFT on the frozen QAT W4A8 base fixed to its encodings (autofill distilled from the float
   base plus half the task loss, caption task loss only), the adapters added to the QAT export (1+N LoRA).
   Needs ``qat_w4a8_ch`` from ``table``. ``--qalft_setting w2a8`` (or another width) runs the same comparison on
   ``qat_w2a8_ch`` with PTQ at that width; its runs are named ``lora_qat_w2a8_<task>``, ``qalft_w2a8_<task>``, ...
   ``--qlora_bases bnb_nf4 bnb_int8`` adds ``qlora_nf4_<task>`` / ``qlora_int8_<task>``: LoRA on float LoRA's start
   quantized by bitsandbytes (weights only; QLoRA), evaluated on that base.
4. ``mixed``: per-layer sensitivity of the base and mixed-precision plans at 3, 4 and 5 average weight bits
   (``python -m plugins.quantization.sensitivity``, plans under ``--work``/plans and copied to ``--out``), QAT
   with each plan (``mixed_avg3`` ...) against uniform QAT at 3 and 5 bits (``qat_uniform_w3a8_ch``,
   ``qat_uniform_w5a8_ch``; 4 bits is the table's ``qat_w4a8_ch``), and the same without training: PTQ with each
   plan (``ptq_mixed_avg3`` ...) against uniform PTQ (``ptq_uniform_w3a8_ch``, ``_w4a8_ch``, ``_w5a8_ch``).
   Layers are ranked by the KL divergence from the float model (``--sensitivity_metric loss``: by the loss change).
5. ``stacked``: the sparsity ramp to 75% and QAT W4A8 in one fine-tune of the base (``stacked_ramp75_qat_w4a8``;
   with ``--stack_scopes whole`` also over every Linear and the token table: ``stacked_whole_ramp75_qat_w4a8``),
   exported; ``bpv.json`` under ``--out`` gathers the ``summary`` of every export's ``*_bpv.json``: bits per weight
   over the layers each plugin packs (the language model's Linear layers here). ``qat_bpv.json`` of the stacked
   export counts the sparse integer codes with a bitmask when that is smaller, i.e. sparsity and quantization
   together; its ``sparsity_bpv.json`` packs the float values. ``--stack_seeds`` adds seed replicas, each beside
   a float fine-tune of its seed; ``--run_tag T`` ends the float fine-tune's and the stacked runs' names in ``_T``
   (runs of another length or rate: ``run_gpu_studies.sh`` tags them ``_<steps>steps_lr<lr>``).
6. ``runtime``: every QAT export of ``table`` run by the integer reference runtime
   (``python -m plugins.quantization.runtime``) against its fake-quant model on 64 validation samples per task, on
   the CPU beside the GPU stages: top-1 agreement and largest logit difference in ``runtime_<run>.json``.
   ``size``: each ``--stack_scopes`` stack's whole-model bits per weight before training it (the base, or the GPU
   base's spec, pruned once by magnitude and rounded to 4 bits, exported and packed; ``stack_size.json``), CPU.
7. ``overhead``: training step time of QAT W4A8 against the same run without the plugin
   (``vlmc bench --without_plugins``), GPU otherwise idle.
8. ``collect``: every run's summary into ``accuracy.csv`` (``framework.sweep``).

    python experiments/quantization_study.py --out experiments/results/quantization            # on one CUDA GPU
    python experiments/quantization_study.py table qalft collect --base_export exports/gpu_base
    python experiments/quantization_study.py --smoke --out /tmp/qsmoke --work /tmp/qsmoke_work  # wiring check, CPU
    python experiments/quantization_study.py table qalft collect --base_config experiments/quickstart.yaml \
        --base_export <quickstart export> --settings w4a8 --granularities ch --ft_batch 16 --workers 0 --parallel 1
        # CPU scale: the quickstart model

Each run's log, summary and export land under ``--work``; summaries, plans and benchmark JSONs under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_sparsity_study() -> Any:
    """experiments/ is not a package: load the sparsity study's module from its file."""
    name = "vlmc_sparsity_study"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "sparsity_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sparsity_study = _load_sparsity_study()
Job = sparsity_study.Job
callback = sparsity_study.callback
LANGUAGE_MODEL = sparsity_study.LANGUAGE_MODEL

QAT = "plugins.quantization.QuantizationAwareTraining"
PTQ = "plugins.quantization.PostTrainingQuantization"
QALFT = "plugins.quantization.QALFT"
RAMP = "plugins.sparsity.SparsityRamp"
DISTILLATION = "plugins.distillation.Distillation"
#: The table's settings: name -> (weight bits, activation bits).
SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, 16), "w2a8": (2, 8)}
#: Weight granularities: name -> spec keys.
GRANULARITY = {"ch": {"granularity": "channel"}, "g32": {"granularity": "group", "group_size": 32}}
TASKS = ("autofill", "caption")
#: What the stacked stage sparsifies and quantizes: the language model's Linear layers (not its head), or every
#: Linear and the token table (vision tower, projector, head too; only norms, biases, the patch convolution and
#: position embeddings stay 16-bit), or that with the head (or the head and the token table) 4-bit but not pruned.
_WHOLE = {"include": ".*", "exclude": "position_embedding", "types": ["Linear", "Embedding"]}
#: scope -> (the ramps, each (targets, ranking[, final sparsity, default 0.75]), and QAT's targets). ``_global``: one magnitude ranking across all
#: the pruned tensors, so the towers need not lose the same share each (75% overall, as in the others); ``_rows``:
#: every output row pruned to 75% (a token table's rows are its tokens); ``_table_rows``: the Linear layers ranked
#: layer-wide and the token table per row, by a second ramp.
_NO_HEAD = {**_WHOLE, "exclude": "position_embedding|lm_head"}
_TABLE = {"include": "embed_tokens", "types": ["Embedding"]}
_VISION = {"include": "vision_tower|multi_modal_projector", "types": ["Linear"]}
_WHOLE_PATCHES = {**_WHOLE, "types": ["Linear", "Embedding", "Conv2d"]}
STACK_SCOPES = {
    "language_model": (((LANGUAGE_MODEL, "layer"),), LANGUAGE_MODEL),
    "whole": (((_WHOLE, "layer"),), _WHOLE),
    "whole_dense_head": (((_NO_HEAD, "layer"),), _WHOLE),
    "whole_dense_head_global": (((_NO_HEAD, "global"),), _WHOLE),
    "whole_dense_tables": ((({**_WHOLE, "exclude": "position_embedding|lm_head|embed_tokens"}, "layer"),), _WHOLE),
    "whole_dense_head_rows": (((_NO_HEAD, "row"),), _WHOLE),
    "whole_dense_head_table_rows": ((({**_NO_HEAD, "types": ["Linear"]}, "layer"), (_TABLE, "row")), _WHOLE),
    # The vision tower reads the digits on the base that reads: it and the projector keep half their weights, the
    # text tower pays for it at 80% (its table per row), the head 4-bit dense: 1.710 bits per weight (sixteenth run).
    "whole_vision50_text80": (((LANGUAGE_MODEL, "layer", 0.8), (_TABLE, "row", 0.8), (_VISION, "layer", 0.5)),
                              _WHOLE),
    # The budget left under 1.8 (the sixteenth run measured 1.710) spent on the text tower or on the vision tower:
    # estimated from that run's packed parts (mask entropy plus ~3.2 Huffman-coded bits per kept 4-bit value), about
    # 1.79 (text at 78%) and 1.77 (vision at 40%).
    "whole_vision50_text78": (((LANGUAGE_MODEL, "layer", 0.78), (_TABLE, "row", 0.78), (_VISION, "layer", 0.5)),
                              _WHOLE),
    "whole_vision40_text80": (((LANGUAGE_MODEL, "layer", 0.8), (_TABLE, "row", 0.8), (_VISION, "layer", 0.4)),
                              _WHOLE),
    # The patch convolution 4-bit too (295k weights, at 16 bits 0.1 of the 1.77 bits per weight). The `size` stage
    # on the GPU base's spec: 1.671 bits per weight against 1.750 without it (trained, that one measured 1.771).
    "whole_vision40_text80_patches": (((LANGUAGE_MODEL, "layer", 0.8), (_TABLE, "row", 0.8),
                                       (_VISION, "layer", 0.4)), _WHOLE_PATCHES),
    # What that saves spent on the vision tower, which reads the digits: it and the projector 4-bit dense (3.31 bits
    # per weight packed against 2.97 at 40%): 1.726 by the `size` stage, about 1.75 once trained.
    "whole_dense_vision_text80_patches": (((LANGUAGE_MODEL, "layer", 0.8), (_TABLE, "row", 0.8)), _WHOLE_PATCHES),
    # That setting trained to 1.749 bits per weight, 0.03 F1 points short of the goal on the mean of three seeds
    # (twentieth run): the 0.05 bits left under 1.8 spent on the text tower, at 79%.
    "whole_dense_vision_text79_patches": (((LANGUAGE_MODEL, "layer", 0.79), (_TABLE, "row", 0.79)), _WHOLE_PATCHES),
}
BUDGETS = (3, 4, 5)
#: Where the stacked runs' sparsity ramps end, as a share of the run: the rest recovers at the final sparsity.
STACK_RAMP_END = 0.7


def stack_scope(scope: str) -> tuple[tuple[tuple[dict[str, Any], str, float], ...], dict[str, Any]]:
    """A ``STACK_SCOPES`` entry as (its ramps, each (targets, ranking, final sparsity: 0.75 unless given), and
    QAT's targets)."""
    ramps, qat_targets = STACK_SCOPES[scope]
    return tuple((ramp[0], ramp[1], ramp[2] if len(ramp) > 2 else 0.75) for ramp in ramps), qat_targets


def weight_spec(bits: int, granularity: str, observer: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"bits": bits, "symmetric": True, **GRANULARITY[granularity]}
    if observer is not None:
        spec["observer"] = observer
    return spec


#: ``--shared_inputs``: the siblings of a Llama/Qwen layer that read one tensor, one input quantizer per group.
SHARED_INPUTS = [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]


def activation_args(bits: int, shared_inputs: bool = False) -> dict[str, Any]:
    """Static per-tensor activations at the Linear inputs, the KV cache per token, the projector output; with
    ``shared_inputs`` one quantizer per tensor read by several Linears (``SHARED_INPUTS``), as on a device.

    Min/max ranges: clipping at the 99.99th percentile cut the activation outliers and cost about 2 points of top-1
    agreement at 8 bits (experiments/results/quantization/cpu_quickstart/ablation)."""
    shared = {"shared_inputs": SHARED_INPUTS} if shared_inputs else {}
    return {**shared, "activations": {"bits": bits, "granularity": "tensor", "symmetric": False, "observer": "minmax"},
            "activation_points": ["input"],
            "activation_sites": [
                {"targets": {"include": "language_model.*(k_proj|v_proj)$"}, "points": ["output"],
                 "spec": {"bits": bits, "granularity": "token", "mode": "dynamic", "symmetric": False}},
                {"targets": {"include": "multi_modal_projector$", "types": ["Module"]}, "points": ["output"]}]}


class Study(sparsity_study.Study):
    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(opts)
        if getattr(opts, "base_export", None):
            self.base_export = Path(opts.base_export).resolve()
        self.exports = self.work / "exports"
        self.plans = self.work / "plans"

    def python(self, name: str, args: list[str], cwd: Path | None = None) -> int:
        """As the sparsity study's, but in a folder of its own (Lightning writes ``config.yaml`` where it runs)."""
        if cwd is None:
            cwd = self.work / "runs" / name
            cwd.mkdir(parents=True, exist_ok=True)
        return super().python(name, args, cwd)

    @property
    def shared_inputs(self) -> bool:
        return bool(getattr(self.opts, "shared_inputs", False))

    @property
    def table_suffix(self) -> str:
        """``_shared`` on the table's quantized runs with ``--shared_inputs``, so both placements share a work dir."""
        return "_shared" if self.shared_inputs else ""

    @property
    def calibration(self) -> int:
        return 2 if self.opts.smoke else 32

    # ------------------------------------------------------------------ plugin arguments
    def qat(self, bits: int, act_bits: int = 8, granularity: str = "ch", plan: Path | None = None) -> dict[str, Any]:
        args = dict(targets=LANGUAGE_MODEL, weights=weight_spec(bits, granularity, "mse" if bits <= 2 else None),
                    **activation_args(act_bits, self.shared_inputs), start_step=0, calibration_batches=self.calibration,
                    freeze_observers_at=0.9, scale_lr=1e-4, float_reference=str(self.qat_reference))
        if plan is not None:
            args["plan"] = str(plan)
        return callback(QAT, **args)

    def ptq(self, bits: int, act_bits: int = 8, granularity: str = "ch", plan: Path | None = None) -> dict[str, Any]:
        args = dict(targets=LANGUAGE_MODEL, weights=weight_spec(bits, granularity, "mse"),
                    **activation_args(act_bits, self.shared_inputs), calibration_batches=self.calibration)
        if plan is not None:
            args["plan"] = str(plan)
        return callback(PTQ, **args)

    def lora(self, task: str, **args: Any) -> dict[str, Any]:
        return callback(QALFT, targets=LANGUAGE_MODEL, r=16 if not self.opts.smoke else 4,
                        alpha=32.0 if not self.opts.smoke else 8.0, dropout=0.05, adapter_name=task, **args)

    @staticmethod
    def task_only(task: str) -> str:
        return f"--data.init_args.tasks={json.dumps({task: 1.0})}"

    def on(self, model: Path, steps: int | None = None, lr: float | None = None) -> list[str]:
        """A run from ``model`` (fine-tuned for ``steps`` when given) at the fine-tuning batch size."""
        args = [f"--model.init_args.model={model}", f"--data.init_args.batch_size={self.opts.ft_batch}"]
        if steps is not None:
            args += [f"--model.init_args.lr={lr}", *self.steps(steps)]
        return args

    # ------------------------------------------------------------------ the study's runs
    @property
    def float_finetune(self) -> Path:
        """The float model QAT rows are compared with: the base fine-tuned like them, without quantization."""
        return self.exports / f"float_finetune{self.run_tag}"

    @property
    def qat_reference(self) -> Path:
        """The float model QAT runs measure top-1 agreement against (``--qat_reference``)."""
        base = getattr(self.opts, "qat_reference", "float_finetune") == "base"
        return self.base_export if base else self.float_finetune

    @property
    def float_lora(self) -> str:
        """Name prefix of the float LoRA runs: ``lora_float`` on the base, ``lora_float_ft`` on the float fine-tune."""
        return "lora_float" if self.opts.lora_float_base == "base" else "lora_float_ft"

    @property
    def float_lora_base(self) -> Path:
        """What float LoRA starts from (``--lora_float_base``): the base, or the float fine-tune as long as the QAT
        run the quantized pipelines start from, so both sides have had the same training before their adapters."""
        return self.base_export if self.opts.lora_float_base == "base" else self.float_finetune

    def float_finetune_job(self) -> Job:
        o = self.opts
        return Job(self.float_finetune.name, "fit", overrides=self.on(self.base_export, o.qat_steps, o.qat_lr),
                   export_to=self.float_finetune)

    def table_jobs(self) -> list[Job]:
        o = self.opts
        jobs = [Job("float", "validate", overrides=self.on(self.base_export))]
        for setting in self.opts.settings:
            bits, act_bits = SETTINGS[setting]
            for gran in self.opts.granularities:
                jobs.append(Job(f"ptq_{setting}_{gran}{self.table_suffix}", "validate",
                                [self.ptq(bits, act_bits, gran)], self.on(self.base_export)))
                if getattr(o, "ptq_only", False):
                    continue
                name = f"qat_{setting}_{gran}{self.table_suffix}"
                jobs.append(Job(name, "fit", [self.qat(bits, act_bits, gran)],
                                self.on(self.base_export, o.qat_steps, o.qat_lr), export_to=self.exports / name))
        return jobs

    @property
    def qalft_setting(self) -> str:
        return getattr(self.opts, "qalft_setting", "w4a8")

    def qalft_name(self, name: str) -> str:
        """``name`` of a QALFT-stage run, tagged with the width when it is not the default W4A8."""
        return name if self.qalft_setting == "w4a8" else f"{name}_{self.qalft_setting}"

    @property
    def qat_w4a8(self) -> Path:
        """The QAT export QALFT starts from: ``qat_<qalft_setting>_ch`` of the table (W4A8 by default)."""
        return self.exports / f"qat_{self.qalft_setting}_ch"

    def lora_fit_jobs(self) -> list[Job]:
        """The LoRA fine-tunes of each task (they need the table's QAT W4A8 export)."""
        o = self.opts
        jobs = []
        for task in TASKS:
            restrict = self.task_only(task)
            runs = ((self.float_lora, self.float_lora_base), (self.qalft_name("lora_qat"), self.qat_w4a8))
            for prefix, model in runs:
                name = f"{prefix}_{task}"
                jobs.append(Job(name, "fit", [self.lora(task, base="float", mode="sft")],
                                [*self.on(model, o.lora_steps, o.lora_lr), restrict], export_to=self.exports / name))
            mode = {"mode": "distill", "temperature": 2.0, "sft_weight": 0.5} if task == "autofill" else {"mode": "sft"}
            jobs.append(Job(f"{self.qalft_name('qalft')}_{task}", "fit",
                            [self.lora(task, base="encodings", encodings=str(self.qat_w4a8 / "qat.encodings"),
                                       adapters_to=str(self.qat_w4a8), **mode)],
                            [*self.on(self.qat_w4a8, o.lora_steps, o.lora_lr), restrict]))
            # QLoRA: the float LoRA's start quantized by bitsandbytes (weights only), adapters trained on it.
            for bnb_base in getattr(o, "qlora_bases", None) or []:
                jobs.append(Job(f"qlora_{bnb_base.removeprefix('bnb_')}_{task}", "fit",
                                [self.lora(task, base=bnb_base, mode="sft")],
                                [*self.on(self.float_lora_base, o.lora_steps, o.lora_lr), restrict]))
        return jobs

    def lora_ptq_jobs(self) -> list[Job]:
        """PTQ at the QALFT width of each float LoRA merged into its base (after :meth:`merge_adapters`)."""
        bits, act_bits = SETTINGS[self.qalft_setting]
        return [Job(f"{prefix}_ptq_{self.qalft_setting}_{task}", "validate", [self.ptq(bits, act_bits)],
                    [*self.on(self.exports / f"{prefix}_{task}_merged"), self.task_only(task)])
                for task in TASKS for prefix in (self.float_lora, self.qalft_name("lora_qat"))]

    def merge_adapters(self) -> int:
        """Merge each float LoRA export's adapter into its base weights and save the result as an HF folder."""
        from framework.export import export_model
        from plugins.quantization import load_quantized_base
        from plugins.quantization.adapters import lora_layers, remove_lora

        code = 0
        for task in TASKS:
            for prefix in (self.float_lora, self.qalft_name("lora_qat")):
                source, target = self.exports / f"{prefix}_{task}", self.exports / f"{prefix}_{task}_merged"
                if (target / "config.json").exists() and not self.opts.rerun:
                    continue
                if not (source / "config.json").exists():
                    print(f"[skip] merge {source.name}: no export", flush=True)
                    code = 1
                    continue
                loaded = load_quantized_base(source, [task])
                for layer in lora_layers(loaded.model).values():
                    layer.merge(adapter_names=[task])  # base weight += scaling * B @ A
                remove_lora(loaded.model)
                export_model(loaded.model, loaded.tokenizer, loaded.image_processor, target, [], overwrite=True,
                             extra={"merged_from": str(source), "adapter": task})
                print(f"[done] merged {source.name} into {target}", flush=True)
        return code

    def plan_path(self, budget: int) -> Path:
        return self.plans / f"plan_avg{budget}.json"

    def sensitivity(self) -> int:
        """Per-layer sensitivity of the base, measured once, and one plan per budget (``--mixed_bits`` candidates)."""
        self.plans.mkdir(parents=True, exist_ok=True)
        config = self.work / "configs" / "sensitivity.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        # The plans are measured with the weight quantizer of the runs that use them: PTQ's (MSE-searched scales)
        # where the plans are only validated with PTQ, QAT's otherwise. A table of min-max weights chose plans for
        # a PTQ with MSE scales before (cpu_quickstart/mixed_refine/plan_check).
        plugin = self.ptq(4) if self.opts.mixed_ptq_only else self.qat(4)
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": [plugin]}}))
        if all(self.plan_path(b).exists() for b in BUDGETS) and not self.opts.rerun:
            self.publish_plans()  # plans made earlier (or by hand) still go beside the results that used them
            return 0
        args = ["-m", "plugins.quantization.sensitivity", *self.common(), "--config", str(config),
                *self.on(self.base_export), "--budget_avg_bits", *map(str, BUDGETS),
                "--bits", *map(str, self.opts.mixed_bits),
                "--pareto", "2", "2.5", "3", "3.5", "4", "5", "6", "8",
                "--batches", "2" if self.opts.smoke else str(self.opts.sensitivity_batches),
                "--metric", self.opts.sensitivity_metric, "--out", str(self.plans / "plan_avg{budget}.json")]
        if self.opts.sensitivity_context_bits is not None:
            args += ["--context_bits", str(self.opts.sensitivity_context_bits)]
        if getattr(self.opts, "mixed_refine_evaluations", 0):
            args += ["--refine_evaluations", str(self.opts.mixed_refine_evaluations)]
            if getattr(self.opts, "mixed_refine_metric", None):
                args += ["--refine_metric", self.opts.mixed_refine_metric]
            if getattr(self.opts, "mixed_refine_batches", None):
                args += ["--refine_batches", str(self.opts.mixed_refine_batches)]
            if getattr(self.opts, "mixed_refine_held_out", 0):
                args += ["--refine_held_out", str(self.opts.mixed_refine_held_out)]
        if self.opts.smoke:
            args += ["--device", "cpu"]
        code = self.python("sensitivity", args)
        self.publish_plans()
        return code

    def publish_plans(self) -> None:
        for budget in BUDGETS:
            if self.plan_path(budget).exists():
                shutil.copy(self.plan_path(budget), self.out / self.plan_path(budget).name)

    def mixed_jobs(self) -> list[Job]:
        o = self.opts
        jobs = []
        if not o.mixed_ptq_only:
            fine_tunes = [(f"mixed_avg{b}", self.qat(4, plan=self.plan_path(b)))
                          for b in BUDGETS if self.plan_path(b).exists()]
            fine_tunes += [(f"qat_uniform_w{bits}a8_ch", self.qat(bits)) for bits in (3, 5)]
            jobs += [Job(name, "fit", [plugin], self.on(self.base_export, o.qat_steps, o.qat_lr),
                         export_to=self.exports / name) for name, plugin in fine_tunes]
        # Without training, which can wash out where the bits went: PTQ with each plan against uniform PTQ.
        jobs += [Job(f"ptq_mixed_avg{b}", "validate", [self.ptq(4, plan=self.plan_path(b))], self.on(self.base_export))
                 for b in BUDGETS if self.plan_path(b).exists()]
        jobs += [Job(f"ptq_uniform_w{bits}a8_ch", "validate", [self.ptq(bits)], self.on(self.base_export))
                 for bits in (3, 4, 5)]  # 4 bits repeats the table's PTQ W4A8, so `mixed` alone has every reference
        return jobs

    def stacked_jobs(self) -> list[Job]:
        o = self.opts
        jobs = []
        for scope in o.stack_scopes:
            ramps, qat_targets = stack_scope(scope)
            if o.stack_sparsity_scope and any(ranking != o.stack_sparsity_scope for _, ranking, _ in ramps):
                ramps, suffix = tuple((targets, o.stack_sparsity_scope, final) for targets, _, final in ramps), \
                    f"_{o.stack_sparsity_scope}"
            else:
                suffix = ""
            # Two ramps on disjoint tensors keep their state under their own names.
            sparsity = [callback(RAMP, final_sparsity=final, schedule="cubic", start=0.0, end=o.stack_ramp_end,
                                 update_every=max(1, o.qat_steps // 50), targets=targets, scope=ranking,
                                 name="sparsity" if index == 0 else f"sparsity_{index}")
                        for index, (targets, ranking, final) in enumerate(ramps)]
            qat = self.qat(4, o.stack_activation_bits)
            qat["init_args"]["targets"] = qat_targets
            # Shares other than 75%: the scope's name says them.
            ramp = "" if any(final != 0.75 for _, _, final in ramps) else "_ramp75"
            if o.stack_ramp_end != STACK_RAMP_END:  # the share of the run the ramp takes, when not the default
                ramp += f"_end{round(o.stack_ramp_end * 100)}"
            name = (("stacked" if scope == "language_model" else f"stacked_{scope}")
                    + f"{suffix}{ramp}_qat_w4a{o.stack_activation_bits}")
            plugins = [*sparsity, qat]
            if o.stack_distill:
                # Recovery toward a float model's answer distributions as well as the labels: the base, or the float
                # fine-tune as long as the stack (a stronger teacher where fine-tuning still improves the base).
                teacher = self.float_finetune if o.stack_teacher == "float_finetune" else self.base_export
                features = {}
                if o.stack_feature_weight > 0:  # layer-wise too: the stack keeps every shape, so states align
                    features = {"feature_weight": o.stack_feature_weight, "feature_layers": self.feature_layers()}
                plugins.append(callback(DISTILLATION, teacher=str(teacher), weight=1.0, temperature=2.0, **features))
                name += ("_distill" if o.stack_teacher == "base" else "_distill_ft") + ("_features" if features else "")
            name += self.run_tag
            jobs.append(Job(name, "fit", plugins, self.on(self.base_export, o.qat_steps, o.qat_lr),
                            export_to=self.exports / name))
        # Seed replicas, each with a float fine-tune of its seed, so a stack and its reference are compared on the
        # same samples. Teachers and the agreement reference stay the seed-0 models.
        seeded = [sparsity_study.seed_replica(job, seed) for seed in getattr(o, "stack_seeds", [])
                  for job in (self.float_finetune_job(), *jobs)]
        return jobs + seeded

    def stack_sizes(self) -> int:
        """Whole-model bits per weight of each ``--stack_scopes`` stack before training it: the base (its export,
        else the GPU base's spec with initial weights, which packs like the trained base: 2.97 bits per weight for
        the vision tower at 40% either way) pruned once by magnitude to each ramp's final sparsity, its QAT targets
        rounded to 4 bits per channel, exported and packed as a trained stack is. ``stack_size.json`` under
        ``--out``; the table is printed."""
        import tempfile

        import torch

        from framework.export import export_model
        from framework.models import load_vlm
        from framework.selection import ModuleSelection
        from plugins.quantization import PostTrainingQuantization, QuantSpec
        from plugins.sparsity import OneShotPruning

        if (self.base_export / "config.json").exists():
            source = self.base_export
        elif self.opts.base_export:
            raise SystemExit(f"size: --base_export {self.opts.base_export} holds no exported model (config.json); "
                             "leave it out to size the GPU base's spec")
        else:
            source = sparsity_study.BASE_SPEC if not self.opts.smoke else ROOT / "experiments/models/llava-test.json"
        parts = {"patches": "patch_embedding", "vision tower": "vision_tower", "projector": "multi_modal_projector",
                 "token table": "embed_tokens", "head": "lm_head", "text linears": ""}
        rows = {}
        for scope in self.opts.stack_scopes:
            ramps, qat_targets = stack_scope(scope)
            torch.manual_seed(0)  # a spec's initial weights: the same for every scope, and the figures repeat
            loaded = load_vlm(str(source))
            model, plugins = loaded.model, []
            for index, (targets, ranking, final) in enumerate(ramps):
                pruning = OneShotPruning(ModuleSelection(**targets), "magnitude", final, scope=ranking,
                                         name="sparsity" if index == 0 else f"sparsity_{index}")
                pruning.transform(model)
                pruning.prune(None, None)
                plugins.append(pruning)
            quantization = PostTrainingQuantization(QuantSpec(**weight_spec(4, "ch")), None,
                                                    ModuleSelection(**qat_targets), name="qat")
            quantization.transform(model)
            quantization.init_weight_quantizers(model)
            with tempfile.TemporaryDirectory() as tmp:
                out = export_model(model, loaded.tokenizer, loaded.image_processor, Path(tmp) / scope,
                                   [*plugins, quantization])
                report = json.loads((out / "qat_bpv.json").read_text())
            by_part: dict[str, list[float]] = {}
            for layer in report["layers"]:
                part = next(part for part, pattern in parts.items() if pattern in layer["name"])
                numel, bits = by_part.setdefault(part, [0, 0.0])
                by_part[part] = [numel + layer["numel"], bits + layer["bpv"] * layer["numel"]]
            rows[scope] = {"source": str(source), "model_bits_per_weight": report["model"]["bits_per_weight"],
                           "packed_bits_per_weight": report["summary"]["bpv"],
                           "sparsity": report["summary"]["sparsity"],
                           "rest_parameters": report["model"]["rest_parameters"],
                           "parts": {part: {"parameters": n, "bits_per_weight": b / n} for part, (n, b) in
                                     by_part.items()}}
            print(f"{scope:40s} whole model {rows[scope]['model_bits_per_weight']:.3f}, packed "
                  f"{rows[scope]['packed_bits_per_weight']:.3f}, sparsity {rows[scope]['sparsity']:.3f}, 16-bit rest "
                  f"{rows[scope]['rest_parameters']}; " + ", ".join(
                      f"{part} {v['bits_per_weight']:.2f}" for part, v in rows[scope]["parts"].items()), flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "stack_size.json").write_text(json.dumps(rows, indent=2))
        return 0

    def bpv(self) -> None:
        """Each export's ``*_bpv.json`` summary (bits per weight over the packed layers) into ``bpv.json``."""
        rows = {}
        for path in sorted(self.exports.glob("*/*_bpv.json")):
            report = json.loads(path.read_text())
            # The packed layers' figure, and the whole model's where the export reports it (the rest at 16 bits).
            whole = report.get("model", {}).get("bits_per_weight")
            rows.setdefault(path.parent.name, {})[path.name] = {**report.get("summary", {}),
                                                                **({"model_bits_per_weight": whole} if whole else {})}
        (self.out / "bpv.json").write_text(json.dumps(rows, indent=2))
        for name, files in rows.items():
            print(f"bpv {name}: " + ", ".join(f"{f} {s.get('bpv', float('nan')):.3f}"
                                              + (f" (whole model {s['model_bits_per_weight']:.3f})"
                                                 if "model_bits_per_weight" in s else "") for f, s in files.items()),
                  flush=True)

    def runtime_checks(self) -> int:
        """Each QAT export run by the integer reference runtime against its fake-quant model, on the CPU (the
        runtime's int64 matmuls have no CUDA kernel) beside the GPU jobs; ``runtime_<run>.json`` under ``--out``."""
        code = 0
        samples = "4" if self.opts.smoke else "64"
        for folder in sorted(self.exports.glob("qat_*")):
            out = self.out / f"runtime_{folder.name}.json"
            if not (folder / "qat.encodings").exists() or (out.exists() and not self.opts.rerun):
                continue
            code |= self.python(f"runtime_{folder.name}", [
                "-m", "plugins.quantization.runtime", str(folder), "--samples", samples, "--batch_size", "16",
                "--image_size", "64" if self.opts.smoke else "128", "--threads", "8", "--out", str(out)])
        return code

    def overhead(self) -> int:
        o = self.opts
        config = self.work / "configs" / "overhead_qat_w4a8.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({"trainer": {"callbacks": [self.qat(4)]}}))
        steps = ["--steps", "3", "--warmup", "1"] if o.smoke else ["--steps", "40", "--warmup", "20"]
        return self.python("overhead_qat_w4a8", [
            "-m", "framework.cli", "bench", *self.common(), "--config", str(config),
            f"--model.init_args.model={self.base_export}", f"--data.init_args.batch_size={o.ft_batch}",
            *steps, "--new_tokens", "4", "--repeats", "1", "--without_plugins",
            "--out", str(self.out / "overhead_qat_w4a8.json")])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*",
                        default=["base", "table", "runtime", "qalft", "mixed", "stacked", "overhead", "collect"],
                        help="stages to run; `pack` alone only writes the --pack archive of what exists so far")
    sparsity_study.add_shared_arguments(parser, out="experiments/results/quantization",
                                        work="/tmp/vlmc_quantization_study")
    parser.add_argument("--base_export", help="an exported dense base to start from (the `base` stage is skipped)")
    parser.add_argument("--qat_steps", type=int, default=1000)
    parser.add_argument("--qat_lr", type=float, default=1e-4)
    parser.add_argument("--lora_steps", type=int, default=500)
    parser.add_argument("--lora_lr", type=float, default=2e-4)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="the table's weight/activation widths")
    parser.add_argument("--granularities", nargs="+", choices=list(GRANULARITY), default=list(GRANULARITY),
                        help="the table's weight granularities")
    parser.add_argument("--shared_inputs", action="store_true",
                        help="the table's quantized runs share one input quantizer among q/k/v and among gate/up "
                             "(device-aligned placement); their names end in _shared")
    parser.add_argument("--sensitivity_metric", choices=["loss", "kl"], default="kl",
                        help="the mixed stage's per-layer sensitivity: KL divergence from the float model's "
                             "next-token distribution (never negative), or the change of the answer loss (half of "
                             "its per-layer values were negative noise on the quickstart model, and its plans lost "
                             "to KL's at every budget: experiments/results/quantization/README.md)")
    parser.add_argument("--mixed_ptq_only", action="store_true",
                        help="the mixed stage compares plans with PTQ only (no QAT fine-tunes)")
    parser.add_argument("--ptq_only", action="store_true",
                        help="the table stage runs its PTQ rows only (no float fine-tune, no QAT fine-tunes)")
    parser.add_argument("--sensitivity_batches", type=int, default=8, help="batches the sensitivity is measured on")
    parser.add_argument("--sensitivity_context_bits", type=int, default=None,
                        help="measure each layer's sensitivity with the other layers quantized at this width "
                             "(default: float), so errors that add up across low-bit layers count")
    parser.add_argument("--mixed_bits", type=int, nargs="+", default=[2, 3, 4, 8],
                        help="the weight widths a mixed plan chooses from (a 5-bit average with 2/3/4/8 must pair 4 "
                             "and 8 bits where uniform W5 needs neither)")
    parser.add_argument("--mixed_refine_evaluations", type=int, default=0,
                        help="refine each mixed plan by measuring whole plans on the sensitivity batches (this many "
                             "measurements per budget; the result is never measured worse than the widest uniform "
                             "width within the budget); 0: the knapsack plan over single-layer sensitivities")
    parser.add_argument("--mixed_refine_metric", choices=["loss", "kl", "disagreement"], default=None,
                        help="what refining measures whole plans by (default: --sensitivity_metric); disagreement: "
                             "one minus the top-1 agreement with the float model")
    parser.add_argument("--mixed_refine_batches", type=int, default=None,
                        help="refining measures whole plans on this many training batches after the sensitivity "
                             "batches (default: the sensitivity batches)")
    parser.add_argument("--mixed_refine_held_out", type=int, default=0,
                        help="of the batches refining measures on, the last this many are held out: a move is kept "
                             "only if it improves them too")
    parser.add_argument("--qat_reference", choices=["float_finetune", "base"], default="float_finetune",
                        help="what QAT runs' top-1 agreement is measured against: a float fine-tune as long as they "
                        "are (trained first; the table's fair comparison) or the base itself (no float fine-tune; "
                        "enough where only QALFT needs the QAT export)")
    parser.add_argument("--stack_scopes", nargs="+", choices=list(STACK_SCOPES), default=["language_model"],
                        help="the stacked stage's runs: 75%% sparse + W4A8 over the language model's Linear layers "
                             "(stacked_ramp75_qat_w4a8) and/or over every Linear and the token table "
                             "(stacked_whole_ramp75_qat_w4a8; whole_dense_head: the LM head 4-bit but not pruned; "
                             "whole_dense_head_global: that with one sparsity ranking across all pruned tensors; "
                             "whole_dense_tables: the token table and head 4-bit, neither pruned; "
                             "whole_dense_head_rows: whole_dense_head with every output row, each token of the table "
                             "too, pruned to 75%%; whole_dense_head_table_rows: Linear layers ranked layer-wide, the "
                             "table per row; whole_vision50_text80: the vision tower and projector at 50%%, the text "
                             "tower at 80%%, the head dense; whole_vision50_text78 and whole_vision40_text80: the "
                             "same with the text tower at 78%% or the vision tower at 40%%; "
                             "whole_vision40_text80_patches: that with the patch convolution 4-bit too; "
                             "whole_dense_vision_text80_patches: the vision tower and projector 4-bit but not "
                             "pruned, the patch convolution 4-bit), "
                             "whose export's whole-model bits per weight is the size a device stores")
    parser.add_argument("--lora_float_base", choices=["base", "float_finetune"], default="base",
                        help="what the qalft stage's float LoRA starts from: the base, or the float fine-tune as long "
                             "as the QAT run under the quantized pipelines (trained first), so both sides have had the "
                             "same training before their adapters; those runs are named lora_float_ft_<task>")
    parser.add_argument("--stack_sparsity_scope", choices=["layer", "row", "global"], default=None,
                        help="the stacked runs' sparsity ranking instead of each scope's own; runs that change get "
                             "it in their names (stacked_<scope>_<ranking>_ramp75_qat_w4a8)")
    parser.add_argument("--stack_ramp_end", type=float, default=STACK_RAMP_END,
                        help="where the stacked runs' cubic sparsity ramps end, as a share of the run (the rest "
                             "recovers at the final sparsity); other than the default, run names carry _end<percent>")
    parser.add_argument("--run_tag", default="",
                        help="a tag for runs of another length or rate, e.g. 1000steps_lr2e-4: the float fine-tune and "
                             "the stacked runs are named <run>_<tag>, so they do not meet the default runs' summaries "
                             "and exports (letters, digits, '.', '-' and '_')")
    parser.add_argument("--stack_activation_bits", type=int, choices=[8, 16], default=8,
                        help="the stacked runs' activation bits (their weights are 4-bit): 8 (W4A8) or 16 (W4A16; "
                             "activations are not counted in bits per weight); run names say which (_qat_w4a16)")
    parser.add_argument("--stack_seeds", type=int, nargs="+", default=[],
                        help="more seeds of the stacked runs (named <run>_seed<n>), each beside a float fine-tune of "
                             "its seed (float_finetune_seed<n>) to compare with; not exported")
    parser.add_argument("--stack_distill", action="store_true",
                        help="the stacked runs also distil from a float teacher (plugins.distillation, weight 1, "
                             "temperature 2); their names end in _distill (teacher: the base) or _distill_ft")
    parser.add_argument("--stack_teacher", choices=["base", "float_finetune"], default="base",
                        help="the --stack_distill teacher: the base, or the float fine-tune as long as the stacked "
                             "runs (trained first when missing)")
    parser.add_argument("--stack_feature_weight", type=float, default=0.0,
                        help="with --stack_distill: also distil the text model's hidden states after a third and two "
                             "thirds of its layers and the last (plugins.distillation feature_weight; 0: off); run "
                             "names end in _features")
    parser.add_argument("--qlora_bases", nargs="*", choices=["bnb_nf4", "bnb_int8"], default=[],
                        help="the qalft stage also trains LoRA on these bitsandbytes bases of float LoRA's start "
                             "(weights only, QLoRA style; runs qlora_nf4_<task>, qlora_int8_<task>)")
    parser.add_argument("--qalft_setting", choices=list(SETTINGS), default="w4a8",
                        help="the width of the QALFT stage's quantized base (its table QAT export, per channel) and "
                             "PTQ; runs other than W4A8 carry it in their names")
    opts = parser.parse_args(argv)
    sparsity_study.check_seeds(parser, "--stack_seeds", opts.stack_seeds)
    sparsity_study.check_run_tag(parser, opts.run_tag)
    if not 0.0 < opts.stack_ramp_end <= 1.0:
        parser.error(f"--stack_ramp_end: a share of the run in (0, 1], got {opts.stack_ramp_end}")
    if opts.stack_teacher != "base" and not opts.stack_distill:
        parser.error("--stack_teacher picks the teacher of --stack_distill; without it no stacked run distils")
    if not opts.stack_feature_weight >= 0 or (opts.stack_feature_weight > 0 and not opts.stack_distill):
        parser.error("--stack_feature_weight: a weight >= 0 for the layer-wise term of --stack_distill, which it needs")
    if opts.smoke:
        opts.base_steps, opts.qat_steps, opts.lora_steps, opts.ft_batch = 6, 4, 4, 4
        opts.parallel, opts.workers = min(opts.parallel, 2), 0
    sparsity_study.resolve_gpus(opts)
    study = Study(opts)
    if opts.stages == ["pack"]:
        study.pack(Path(opts.pack))
        return
    codes: dict[str, int] = {}

    def need_base(stage: str) -> None:
        if not (study.base_export / "config.json").exists():
            raise SystemExit(f"{stage}: no dense base at {study.base_export}; run the `base` stage first")

    try:
        if "base" in opts.stages:
            if opts.base_export and (study.base_export / "config.json").exists():
                print(f"[skip] dense_base: using {study.base_export}", flush=True)
            else:
                codes["dense_base"] = study.run(study.base_job())
        qalft_alone = "qalft" in opts.stages and "table" not in opts.stages
        # The QAT runs are compared with a float fine-tune as long; PTQ-only runs are not.
        float_stages = ({"stacked"} | (set() if opts.ptq_only else {"table"})
                        | (set() if opts.mixed_ptq_only else {"mixed"}))
        needs_float = opts.qat_reference == "float_finetune" and (float_stages & set(opts.stages) or (
            qalft_alone and not (study.qat_w4a8 / "qat.encodings").exists()))
        needs_float = needs_float or ("qalft" in opts.stages and opts.lora_float_base == "float_finetune")
        needs_float = needs_float or ("stacked" in opts.stages and opts.stack_distill
                                      and opts.stack_teacher == "float_finetune")
        beside_qat: list[Job] = []
        if needs_float and not (study.float_finetune / "config.json").exists():
            need_base("float_finetune")
            if opts.qat_reference == "base" and qalft_alone and not float_stages & set(opts.stages):
                # Only float LoRA starts from it: it trains beside the QAT run QALFT needs, not before.
                beside_qat.append(study.float_finetune_job())
            else:
                # Every QAT run measures agreement against the float fine-tune, so it comes first.
                codes[study.float_finetune.name] = study.run(study.float_finetune_job())
        if "table" in opts.stages:
            need_base("table")
            # The stacked run needs nothing from the table: it shares the table's pool instead of waiting for it.
            stacked = study.stacked_jobs() if "stacked" in opts.stages else []
            codes.update(study.run_all(study.table_jobs() + stacked, opts.parallel))
        checks = None
        if "runtime" in opts.stages:  # CPU work: runs beside the GPU stages below
            checks = ThreadPoolExecutor(max_workers=1).submit(study.runtime_checks)
        if "mixed" in opts.stages:
            need_base("mixed")
            codes["sensitivity"] = study.sensitivity()
        if "qalft" in opts.stages:
            need_base("qalft")
            if not (study.qat_w4a8 / "qat.encodings").exists():
                # Without the table, run only the table's QAT job that QALFT starts from.
                wanted = [job for job in study.table_jobs() if job.export_to == study.qat_w4a8]
                if "table" in opts.stages or not wanted:
                    raise SystemExit(f"qalft: no QAT {opts.qalft_setting} export at {study.qat_w4a8}")
                codes.update(study.run_all(wanted + beside_qat, opts.parallel))
                if not (study.qat_w4a8 / "qat.encodings").exists():
                    raise SystemExit(f"qalft: the QAT run {wanted[0].name} wrote no encodings to {study.qat_w4a8}")
            elif beside_qat:
                codes.update(study.run_all(beside_qat, opts.parallel))
            codes.update(study.run_all(study.lora_fit_jobs(), opts.parallel))
            codes["merge"] = study.merge_adapters()
            codes.update(study.run_all(study.lora_ptq_jobs(), opts.parallel))
        jobs = []
        if "mixed" in opts.stages:
            jobs += study.mixed_jobs()
        if "stacked" in opts.stages and "table" not in opts.stages:
            need_base("stacked")
            jobs += study.stacked_jobs()
        if jobs:
            codes.update(study.run_all(jobs, opts.parallel))
        if study.exports.exists():
            study.bpv()
        if checks is not None:
            codes["runtime"] = checks.result()
        if "size" in opts.stages:
            codes["size"] = study.stack_sizes()
        if "overhead" in opts.stages:
            need_base("overhead")
            codes["overhead"] = study.overhead()
    finally:
        failed = study.finish(codes)
    if failed:  # every stage ran as far as it could; the exit status still says that runs failed
        raise SystemExit(f"failed runs: {', '.join(sorted(failed))} (see study_status.json and their logs)")


if __name__ == "__main__":
    main()
