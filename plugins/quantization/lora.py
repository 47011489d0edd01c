"""QALFT: quantization-aware LoRA fine-tuning on a frozen quantized base, exported as 1+N LoRA.

Float LoRA followed by PTQ leaves the quantization loss uncontrolled and forces re-quantizing the base for every
adapter update. QALFT trains the adapters directly on the quantized base: the base's fake quantizers are fixed to
the encodings of a QAT / PTQ export (strict, never float), every base weight and scale is frozen, LoRA layers are
added through PEFT, and training and validation both run the quantized model (what the device computes). The
objective is the task loss (``mode: sft``) or a KL distillation from the float teacher, the same model with
quantization and adapters off (``mode: distill``). One task-agnostic quantized base serves N task adapters.

References: QLoRA (Dettmers et al. 2023, NF4 base + bitsandbytes + PEFT); QA-LoRA (Xu et al. 2023,
quantization-aware low-rank adaptation); Qualcomm AIMET's PEFT flow (one base encoding, per-adapter weights);
LoRA (Hu et al. 2022); PEFT (``inject_adapter_in_model``, ``save_pretrained`` adapter layout).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from typing_extensions import override

from framework.losses import answer_distillation_kl, answer_feature_error, check_feature_layers, feature_layers_arg
from framework.module import model_inputs
from framework.plugin import CompressionPlugin, PluginConflictError
from framework.selection import ModuleSelection
from framework.sharding import full_parameters
from plugins.quantization.adapters import (
    ADAPTERS_DIR,
    BNB_KINDS,
    _sha256,
    adapter_names,
    adapter_parameters,
    adapter_state,
    adapters_disabled,
    add_adapter_to_export,
    add_lora,
    attach_from_encodings,
    check_adapter_name,
    dequantize_bnb,
    lora_config,
    quantize_base_bnb,
    read_encodings,
    remove_lora,
    write_adapter,
)
from plugins.quantization.common import default_targets
from plugins.quantization.encodings import export_encodings, weight_codes, write_quantized_export
from plugins.quantization.placement import quantization_disabled, quantizers_of, remove_quantizers
from plugins.quantization.quantizer import FakeQuantizer

BASES = ("encodings", "float", *BNB_KINDS)
MODES = ("sft", "distill")


class QALFT(CompressionPlugin):
    """Train LoRA adapters on a frozen quantized base (QALFT), exported as one base plus one folder per adapter.

    In ``transform`` (before any checkpoint restore): with ``base: encodings`` fake quantizers are placed on every
    tensor the encodings file names and fixed to it (strict: a tensor without an encoding, or an encoding that
    does not fit, is an error); with ``base: bnb_nf4`` / ``bnb_int8`` the ``bnb_targets`` Linear layers become
    bitsandbytes layers; ``base: float`` is the float LoRA baseline. Then every parameter is frozen and PEFT wraps
    the ``targets`` with adapter ``adapter_name`` (r, alpha, dropout), the only trainable parameters. The input and
    output quantizers of a wrapped layer move onto the PEFT wrapper, so the LoRA branch reads the quantized input
    and the KV-cache quantizer (output of ``k_proj`` / ``v_proj``) runs after the LoRA delta is added. Quantizers
    stay on in training, validation, test and predict.

    ``mode: sft`` trains on the task loss (times ``sft_weight``, default 1). ``mode: distill`` adds
    ``distill_weight * T^2 * KL(teacher || student)`` over the answer tokens, the teacher being the same model in
    float without adapters (no gradients, eval mode), and scales the task loss by ``sft_weight`` (default 0). The
    terms are logged as ``compression/<name>/loss_distill`` (weighted), ``kl`` and ``sft`` (raw). With
    ``feature_weight`` > 0 it also matches the teacher's hidden states at ``feature_layers`` (their squared error
    relative to the teacher's, on the same positions; ``loss_features`` and ``feature_error``).

    Export (``vlmc export``) writes the base once (HF folder with the grid values of each quantized weight, the
    encodings ``<name>.encodings``, bit-packed integer codes) and the adapter under
    ``adapters/<adapter_name>/`` (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``). To add a
    task to an existing base export (1+N), set ``adapters_to`` to that folder: at the end of ``fit`` only
    ``adapters/<adapter_name>/`` is written there, after checking that the folder holds the base the run used
    (or run ``python -m plugins.quantization.lora --config ... --ckpt_path ... --out <folder>``).

    Args:
        base: ``encodings`` (fake-quant base from ``encodings``), ``float`` (plain LoRA baseline), ``bnb_nf4`` or
            ``bnb_int8`` (bitsandbytes base, QLoRA style).
        encodings: the ``.encodings`` file of the base (``base: encodings`` only), e.g. the one ``vlmc export``
            wrote beside the QAT model the run starts from.
        targets: Linear layers that get adapters; default the language model's, except ``lm_head``.
        r: LoRA rank, >= 1.
        alpha: LoRA alpha (the delta is scaled by ``alpha / r``), > 0.
        dropout: dropout on the LoRA branch input, in [0, 1).
        adapter_name: the task; names the adapter folder ``adapters/<adapter_name>/``.
        mode: ``sft`` or ``distill``.
        temperature: distillation temperature, > 0.
        distill_weight: weight of the KL term (``mode: distill``), > 0.
        sft_weight: weight of the task loss; default 1 for ``sft`` and 0 for ``distill``.
        feature_weight: weight of the hidden-state term (``mode: distill``; >= 0, 0: off).
        feature_layers: the hidden states it compares (indices into ``hidden_states``: 0 the embeddings, -1 the
            last layer); default ``[-1]``.
        bnb_targets: layers quantized by bitsandbytes (``base: bnb_*``); default as ``targets``' default.
        expect_quantized: Linear layers whose weights the encodings must quantize (``base: encodings``; default
            the language model's except ``lm_head``, the QAT default), so no layer is silently left in float.
        adapters_to: an existing base export to which ``adapters/<adapter_name>/`` is added at the end of fit.
        check_base: before writing to ``adapters_to``, check that its base (weights and encodings) is the one the
            run trained on (loads the folder's model once).
        init_lora_weights: PEFT's LoRA initialisation (``true``: B = 0, so training starts at the base).
        name: log namespace, checkpoint key and export file prefix.

    Raises:
        ValueError: a value outside its range (naming the key); ``encodings`` missing for, or given to, a base that
            does (not) use it; ``distill`` with a bitsandbytes base (no float teacher); ``feature_weight`` without
            ``mode: distill``; ``feature_layers`` empty, repeated or not integers. In ``transform``: a
            ``feature_layers`` index the model does not have;
            encodings that do not fit the model (naming the tensor), ``targets`` that match nothing.
        FileNotFoundError: ``encodings`` does not exist (naming the file).
        ImportError: ``base: bnb_*`` without bitsandbytes.

    Example::

        trainer:
          callbacks:
            - class_path: plugins.quantization.QALFT
              init_args:
                encodings: exports/qat_w4a8/qat.encodings
                targets: {include: "language_model.*(q_proj|k_proj|v_proj|o_proj)$"}
                r: 16
                alpha: 32
                adapter_name: autofill
                mode: distill
                temperature: 2.0
                adapters_to: exports/qat_w4a8
    """

    exclusive_claims = False

    def __init__(
        self,
        base: str = "encodings",
        encodings: str | None = None,
        targets: ModuleSelection | None = None,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
        mode: str = "sft",
        temperature: float = 1.0,
        distill_weight: float = 1.0,
        sft_weight: float | None = None,
        feature_weight: float = 0.0,
        feature_layers: list[int] | None = None,
        bnb_targets: ModuleSelection | None = None,
        expect_quantized: ModuleSelection | None = None,
        adapters_to: str | None = None,
        check_base: bool = True,
        init_lora_weights: bool = True,
        name: str = "qalft",
    ) -> None:
        key = type(self).__name__
        if base not in BASES:
            raise ValueError(f"{key}.base: must be one of {', '.join(repr(b) for b in BASES)}, got {base!r}")
        if base == "encodings":
            if not encodings:
                raise ValueError(f"{key}.encodings: base 'encodings' needs the .encodings file of the quantized base "
                                 "(e.g. exports/qat_w4a8/qat.encodings), or set base: float for a float LoRA")
            if not Path(encodings).is_file():
                raise FileNotFoundError(f"{key}.encodings: encodings file {encodings} does not exist")
        elif encodings is not None:
            raise ValueError(f"{key}.encodings: only used with base: encodings (base is {base!r}); leave it unset")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{key}.r: the LoRA rank must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"{key}.alpha: must be a positive number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{key}.dropout: must be in [0, 1), got {dropout!r}")
        check_adapter_name(adapter_name, f"{key}.adapter_name")
        if mode not in MODES:
            raise ValueError(f"{key}.mode: must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{key}.temperature: must be a positive number, got {temperature!r}")
        if not (distill_weight > 0 and math.isfinite(distill_weight)):
            raise ValueError(f"{key}.distill_weight: must be a positive number, got {distill_weight!r}")
        if sft_weight is not None and not (sft_weight >= 0 and math.isfinite(sft_weight)):
            raise ValueError(f"{key}.sft_weight: must be a number >= 0 or null, got {sft_weight!r}")
        if mode == "sft" and sft_weight == 0:
            raise ValueError(f"{key}.sft_weight: mode 'sft' with sft_weight 0 trains on nothing; use mode: distill")
        if mode == "distill" and base in BNB_KINDS:
            raise ValueError(f"{key}.mode: 'distill' needs the float teacher, which a bitsandbytes base ({base!r}) "
                             "does not keep; use base: encodings or mode: sft")
        if not (feature_weight >= 0 and math.isfinite(feature_weight)):
            raise ValueError(f"{key}.feature_weight: must be a number >= 0 (0: off), got {feature_weight!r}")
        if feature_weight > 0 and mode != "distill":
            raise ValueError(f"{key}.feature_weight: the hidden-state term distils from the float teacher; it needs "
                             "mode: distill")
        layers = feature_layers_arg(feature_layers, f"{key}.feature_layers")
        if bnb_targets is not None and base not in BNB_KINDS:
            raise ValueError(f"{key}.bnb_targets: only used with base: bnb_nf4 / bnb_int8; leave it unset")
        self.base = base
        self.encodings = encodings
        self.targets = targets or default_targets()
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.adapter_name = adapter_name
        self.mode = mode
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.sft_weight = float(sft_weight if sft_weight is not None else (1.0 if mode == "sft" else 0.0))
        self.feature_weight, self.feature_layers = float(feature_weight), layers
        self.needs_hidden_states = self.feature_weight > 0
        self.bnb_targets = bnb_targets or default_targets()
        self.expect_quantized = expect_quantized or default_targets()
        self.adapters_to = adapters_to
        self.check_base = check_base
        self.init_lora_weights = init_lora_weights
        self.name = name
        self.quantizers: dict[str, FakeQuantizer] = {}
        self.wrapped: list[str] = []
        self._encodings_sha: str | None = None
        self._pl_module: pl.LightningModule | None = None
        self._export: dict[str, Any] | None = None

    @property
    def quantized(self) -> bool:
        """Whether the base is quantized (fake-quant or bitsandbytes)."""
        return self.base != "float"

    # ------------------------------------------------------------------ structure
    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of this run's adapter (after :meth:`transform`)."""
        return lora_config(self.wrapped, self.r, self.alpha, self.dropout, init_lora_weights=self.init_lora_weights)

    @override
    def transform(self, model: nn.Module) -> None:
        if self.adapter_name in adapter_names(model):  # idempotent
            return
        if self.feature_weight > 0:  # the teacher is this model: one layer count for both
            check_feature_layers(model, self.feature_layers, f"{self.name}.feature_layers")
        if self.base == "encodings":
            encodings = read_encodings(self.encodings, f"{self.name}.encodings")
            self._encodings_sha = _sha256(Path(self.encodings))
            self.quantizers = attach_from_encodings(model, encodings, expect=self.expect_quantized,
                                                    key=f"{self.name}.encodings")
        elif self.base in BNB_KINDS:
            quantize_base_bnb(model, self.base, self.bnb_targets, key=f"{self.name}.base")
        chosen = self.targets.select(model, owner=f"{self.name}.targets")
        names = [n for n, m in chosen.items() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError(f"{self.name}.targets: matched {len(chosen)} modules but no Linear layer; LoRA adapts "
                             "Linear layers")
        self.wrapped = sorted(names)
        add_lora(model, self.peft_config(), self.adapter_name)
        self.quantizers = quantizers_of(model)
        for quantizer in self.quantizers.values():
            quantizer.enabled, quantizer.observing = True, False

    @override
    def check_compatible(self, others: list[CompressionPlugin]) -> None:
        for other in others:
            if isinstance(other, QALFT):
                raise PluginConflictError(f"{self.name!r} and {other.name!r}: one QALFT run trains one adapter; train "
                                          "each task in its own run and collect them with adapters_to")
            if type(other).__module__.startswith("plugins.quantization.") and self.base == "encodings":
                raise PluginConflictError(f"{self.name!r} ({type(self).__name__}) fixes the base to its encodings; "
                                          f"{other.name!r} ({type(other).__name__}) would quantize it again; "
                                          "drop one of them")

    def lora_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """This run's trainable adapter parameters by qualified name."""
        return adapter_parameters(model, self.adapter_name)

    # ------------------------------------------------------------------ objective
    def _teacher(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        modes = [(module, module.training) for module in model.modules()]  # restored module by module
        model.eval()
        try:
            with torch.no_grad(), quantization_disabled(model), adapters_disabled(model):
                return model(**model_inputs(batch, labels=False), use_cache=False,
                             output_hidden_states=self.needs_hidden_states)
        finally:
            for module, training in modes:
                module.training = training

    @override
    def loss_terms(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        task = getattr(outputs, "loss", None)
        if self.mode == "distill":
            teacher = self._teacher(model, batch)
            kl = answer_distillation_kl(outputs.logits, teacher.logits, batch, self.temperature)
            terms["distill"] = self.distill_weight * kl
            self._log("kl", kl)
            if self.feature_weight > 0:
                error = answer_feature_error(outputs, teacher, batch, self.feature_layers, self.name)
                terms["features"] = self.feature_weight * error
                self._log("feature_error", error)
        if task is not None:
            self._log("sft", task)
            if self.sft_weight != 1.0:
                # The framework adds the task loss with weight 1; this term brings it to sft_weight.
                terms["sft_reweight"] = (self.sft_weight - 1.0) * task
        return terms

    def _log(self, metric: str, value: torch.Tensor) -> None:
        module = self._pl_module
        if module is not None and module._trainer is not None and module.training:
            self.log_metric(module, metric, value)

    # ------------------------------------------------------------------ hooks
    def _quantizers_on(self, pl_module: pl.LightningModule) -> None:
        for quantizer in quantizers_of(pl_module.model).values():
            quantizer.enabled, quantizer.observing = True, False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pl_module = pl_module
        if not self.lora_parameters(pl_module.model):
            raise ValueError(f"{self.name}: adapter {self.adapter_name!r} has no parameters; was transform run?")
        self._quantizers_on(pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._quantizers_on(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantizers_on(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantizers_on(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantizers_on(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapters_to is None or trainer.interrupted:
            return
        with full_parameters(trainer):  # under FSDP the adapter's weights are shards; every rank gathers
            if trainer.is_global_zero:
                self.add_to_export(pl_module.model, self.adapters_to)
        trainer.strategy.barrier("qalft_adapters_to")

    # ------------------------------------------------------------------ state and results
    config_name = "QALFT"

    @override
    def config_echo(self) -> dict[str, Any]:
        return {"base": self.base, "encodings_sha256": self._encodings_sha, "r": self.r, "alpha": self.alpha,
                "adapter_name": self.adapter_name, "targets": self.wrapped}

    def adapter_meta(self) -> dict[str, Any]:
        """What ``vlmc_adapter.json`` records about this adapter."""
        return {"adapter_name": self.adapter_name, "base": self.base, "mode": self.mode, "r": self.r,
                "alpha": self.alpha, "dropout": self.dropout, "targets": len(self.wrapped),
                "encodings_sha256": self._encodings_sha, "plugin": f"{type(self).__module__}.{type(self).__name__}"}

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        lora = sum(p.numel() for p in self.lora_parameters(model).values())
        total = sum(p.numel() for p in model.parameters())
        return {"base": self.base, "mode": self.mode, "adapter_name": self.adapter_name, "r": self.r,
                "alpha": self.alpha, "lora_layers": len(self.wrapped), "lora_parameters": lora,
                "trainable_fraction": lora / total if total else 0.0, "quantizers": len(self.quantizers)}

    # ------------------------------------------------------------------ export
    @override
    def prepare_export(self, model: nn.Module) -> None:
        adapter = adapter_state(model, self.adapter_name)
        remove_lora(model)
        cached: dict[str, Any] = {"adapter": adapter}
        quantizers = quantizers_of(model)
        if quantizers:
            names = set(quantizers)
            cached["encodings"] = export_encodings(model, names)
            cached["codes"] = weight_codes(model, names)
            cached["bits"] = {n: q.spec.bits for n, q in quantizers.items() if n.endswith(".weight")}
            remove_quantizers(model, bake_weights=True, names=names)
        if self.base in BNB_KINDS:
            dequantize_bnb(model)
        self._export = cached

    @override
    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        if self._export is None:
            raise RuntimeError(f"{self.name}: export_artifacts before prepare_export")
        cached, self._export = self._export, None
        files = []
        if "encodings" in cached:
            files += write_quantized_export(cached["encodings"], cached["codes"], cached["bits"], directory,
                                            self.name, extra={"plugin": type(self).__name__})
        folder = Path(ADAPTERS_DIR) / self.adapter_name
        written = write_adapter(directory / folder, cached["adapter"], self.peft_config(), self.adapter_meta())
        return files + [str(folder / f) for f in written]

    def add_to_export(self, model: nn.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write this run's adapter into an existing base export (see
        :func:`~plugins.quantization.adapters.add_adapter_to_export`)."""
        return add_adapter_to_export(model, folder, self.adapter_name, self.peft_config(), self.adapter_meta(),
                                     check_base=self.check_base, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    """``python -m plugins.quantization.lora --config run.yaml --ckpt_path last.ckpt --out exports/qat_w4a8``:
    add the checkpoint's adapter to an existing base export, leaving every other file as it is."""
    from framework.cli import build
    from framework.io import load_checkpoint_weights
    from framework.plugin import find_plugins
    from plugins.quantization.lora import QALFT as plugin_class  # this file may run as __main__

    parser = argparse.ArgumentParser(prog="python -m plugins.quantization.lora",
                                     description="add a QALFT run's adapter to an existing base export")
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of the QALFT run")
    parser.add_argument("--out", required=True, help="the base export folder")
    parser.add_argument("--overwrite", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    opts, rest = parser.parse_known_args(argv)
    cli = build([a for c in opts.config for a in ("--config", c)] + rest, run=False)
    plugins = [p for p in find_plugins(cli.trainer) if isinstance(p, plugin_class)]
    if len(plugins) != 1:
        raise SystemExit(f"config: expected one QALFT callback, found {len(plugins)}")
    plugin, module = plugins[0], cli.model
    plugin.transform(module.model)
    missing, unexpected = module.load_state_dict(load_checkpoint_weights(opts.ckpt_path), strict=False)
    missing = [k for k in missing if not k.startswith(("val_metrics", "val_losses"))]
    if missing or unexpected:
        raise ValueError(f"ckpt_path: {opts.ckpt_path} does not match the config's model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    print(f"added {plugin.add_to_export(module.model, opts.out, overwrite=opts.overwrite)}")


if __name__ == "__main__":
    main()
