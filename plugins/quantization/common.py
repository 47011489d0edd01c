"""Lightning glue shared by QAT and PTQ: placement in ``transform``, claims, summary and the quantized export.

:class:`QuantizedModules` checks the specs in ``__init__`` (errors name the YAML key), attaches the quantizers in
``transform`` (idempotent, before any checkpoint restore, so scales and observer buffers are restored with the
model), claims the quantized weights, reports average bits, and exports: ``prepare_export`` writes each
quantized weight's dequantized grid values into the HF model (``from_pretrained`` loads what the fake-quant
model computed) and removes the quantizers; ``export_artifacts`` writes the encodings, the bit-packed integer
codes and their bits per weight.

Every validation and test batch is also run with quantization switched off: the share of answer positions where
the quantized and the float model predict the same next token is logged as ``compression/<name>/top1_agreement``
and reported in the run summary (the talk's device-vs-float "top-1 overlap"). Beside it, ``near_tie_share`` is the
share of those positions where the float model's two most likely tokens are within ``DECIDED_MARGIN`` probability
of each other, and ``top1_agreement_decided`` the agreement on the others: a model that is unsure between tokens
flips at such positions under any perturbation (bf16 rounding included), which caps agreement whatever the bit
width.

Claims are shared (``exclusive_claims = False``): quantization reads the float weights as a master copy and
rewrites them only at export, as ``scale * (q - zero_point)`` of the weight it is given. A plugin that zeroes
weights (sparsity masks, channel ablation) therefore composes with it: an exact zero is on every grid (the zero
point is an integer), so masked weights stay zero, and under a symmetric grid their codes are 0, so a sparse
quantized weight packs with a bitmask.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from framework.metrics import Top1Agreement
from framework.module import model_inputs
from framework.plugin import CompressionPlugin
from framework.selection import ModuleSelection
from framework.sharding import full_parameters, unsharded_class
from plugins.quantization.config import ActivationSite, QuantSpec, check_points, check_runtime, check_spec
from plugins.quantization.encodings import export_encodings, weight_codes, write_quantized_export
from plugins.quantization.placement import (
    QuantLinear,
    attach_quantizers,
    check_sibling_groups,
    distinct,
    quantization_disabled,
    quantized_module,
    quantizers_of,
    remove_quantizers,
    share_quantizers,
    shared_input_map,
)
from plugins.quantization.quantizer import FakeQuantizer
from plugins.quantization.sensitivity import load_plan, plan_specs

# Float-model positions whose top-2 probabilities are closer than this count as near-ties (see the docstring).
DECIDED_MARGIN = 0.1


def near_ties(logits: torch.Tensor, margin: float = DECIDED_MARGIN) -> torch.Tensor:
    """Positions (``logits.shape[:-1]``) where the two most likely tokens' probabilities differ by less than
    ``margin``."""
    top2 = logits.float().softmax(dim=-1).topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) < margin


def default_targets() -> ModuleSelection:
    """Every Linear layer of the language model except the LM head."""
    return ModuleSelection(include="language_model", exclude="lm_head")


def _reduce(op: Any) -> Any:
    """An all-reduce over data-parallel ranks, or ``None`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=op)
        return out / dist.get_world_size() if op == dist.ReduceOp.SUM else out

    return reduce


def freeze_observers(quantizers: list[FakeQuantizer]) -> None:
    """:meth:`FakeQuantizer.freeze_observer` on each, with ranges combined across data-parallel ranks."""
    reduce_max = _reduce(dist.ReduceOp.MAX) if dist.is_available() else None
    reduce_mean = _reduce(dist.ReduceOp.SUM) if dist.is_available() else None
    for quantizer in distinct(quantizers):  # a shared quantizer freezes once
        quantizer.freeze_observer(reduce_max, reduce_mean)


class QuantizedModules(CompressionPlugin):
    """Base of the quantization plugins (not used on its own); see :class:`QuantizationAwareTraining`."""

    exclusive_claims = False

    def __init__(
        self,
        weights: QuantSpec | None,
        activations: QuantSpec | None,
        targets: ModuleSelection | None,
        activation_points: list[str],
        activation_sites: list[ActivationSite] | None,
        runtime: str,
        name: str,
        plan: str | None = None,
        float_reference: str | None = None,
        integer_eval: bool = False,
        shared_inputs: list[list[str]] | None = None,
    ) -> None:
        key = type(self).__name__
        if shared_inputs is not None:
            shared_inputs = check_sibling_groups(shared_inputs, f"{key}.shared_inputs")
            if activations is None or "input" not in activation_points:
                raise ValueError(f"{key}.shared_inputs: shares input quantizers, so it needs activations with "
                                 "'input' in activation_points")
        self.shared_inputs = shared_inputs
        if not isinstance(integer_eval, bool):
            raise ValueError(f"{key}.integer_eval: must be true or false, got {integer_eval!r}")
        self.integer_eval = integer_eval
        if float_reference is not None and (not isinstance(float_reference, (str, Path)) or not str(float_reference)):
            raise ValueError(f"{key}.float_reference: must be a model path / hub id / spec JSON or null, "
                             f"got {float_reference!r}")
        if plan is not None and (not isinstance(plan, (str, Path)) or not str(plan)):
            raise ValueError(f"{key}.plan: must be the path of a mixed-precision plan JSON or null, got {plan!r}")
        if plan is not None and weights is None:
            raise ValueError(f"{key}.plan: a plan sets per-layer weight bits; set {key}.weights (the spec the plan's "
                             "bits override) too")
        if weights is not None:
            check_spec(weights, "weights", f"{key}.weights")
            check_runtime(weights, "weights", runtime, f"{key}.weights")
        if activations is not None:
            check_spec(activations, "activations", f"{key}.activations")
            check_runtime(activations, "activations", runtime, f"{key}.activations")
        activation_points = check_points(activation_points, f"{key}.activation_points")
        sites = list(activation_sites or [])
        for index, site in enumerate(sites):
            site_key = f"{key}.activation_sites[{index}]"
            check_points(site.points, f"{site_key}.points")
            spec = site.spec or activations
            if spec is None:
                raise ValueError(f"{site_key}.spec: give a spec, or set {key}.activations for it to default to")
            check_spec(spec, "activations", f"{site_key}.spec")
            check_runtime(spec, "activations", runtime, f"{site_key}.spec")
        if weights is None and activations is None and not sites:
            raise ValueError(f"{key}: nothing to quantize; set weights, activations or activation_sites")
        self.weights, self.activations = weights, activations
        self.targets = targets or default_targets()
        self.activation_points = activation_points
        self.activation_sites = sites
        self.runtime = runtime
        self.name = name
        self.plan = None if plan is None else str(plan)
        self.planned_bits: dict[str, int] | None = None
        self.quantizers: dict[str, FakeQuantizer] = {}
        self._export: dict[str, Any] | None = None
        self.agreement = Top1Agreement()
        self.agreement_decided = Top1Agreement()
        self.near_ties = MeanMetric()
        self.last_agreement: float | None = None
        self.last_agreement_decided: float | None = None
        self.last_near_tie_share: float | None = None
        self.float_reference = None if float_reference is None else str(float_reference)
        self._reference_model: nn.Module | None = None  # loaded on first use; never saved with the callback

    # ------------------------------------------------------------------ structure
    @override
    def transform(self, model: nn.Module) -> None:
        key = self.name
        if self.plan is None:
            found = attach_quantizers(model, self.weights, self.activations, self.targets, self.activation_points,
                                      key=key)
        else:
            found = self._attach_planned(model)
        for index, site in enumerate(self.activation_sites):
            found.update(attach_quantizers(model, None, site.spec or self.activations, site.targets, site.points,
                                           key=f"{key}.activation_sites[{index}]"))
        if self.shared_inputs:
            sharing = shared_input_map(model, self.shared_inputs, found, key=f"{key}.shared_inputs")
            share_quantizers(model, sharing)
            found.update({tensor: found[canonical] for tensor, canonical in sharing.items()})
        for quantizer in found.values():
            quantizer.enabled = quantizer.observing = False  # the callback switches them on
        self.quantizers = found
        for module_name in {name.rsplit(".", 1)[0] for name in found}:  # only this plugin's layers
            module = model.get_submodule(module_name)
            if isinstance(module, QuantLinear):
                module.integer_exact = self.integer_eval  # eval only: training keeps the float path

    def _attach_planned(self, model: nn.Module) -> dict[str, FakeQuantizer]:
        """Weight quantizers with the plan's bits per layer (the ``weights`` spec otherwise), activations as usual.

        Raises:
            ValueError: naming the layer: the plan names a layer that is not selected or leaves a selected one out.
        """
        key = self.name
        plan = load_plan(self.plan, f"{key}.plan")
        selected = self.targets.select(model, owner=f"{key}.targets")
        groups = plan_specs(plan, model, selected, self.weights, key=f"{key}.plan")
        found: dict[str, FakeQuantizer] = {}
        for bits, names in sorted(groups.items()):
            only = ModuleSelection(include="^(" + "|".join(re.escape(n) for n in names) + ")$",
                                   types=list(self.targets.types))
            found.update(attach_quantizers(model, dataclasses.replace(self.weights, bits=bits), None, only, key=key))
        if self.activations is not None:
            found.update(attach_quantizers(model, None, self.activations, self.targets, self.activation_points,
                                           key=key))
        self.planned_bits = {name: plan[name] for name in selected}
        order = [f"{n}.{p}" for n in selected for p in ("weight", *self.activation_points)]
        return {name: found[name] for name in order if name in found}

    @override
    def claims(self, model: nn.Module) -> set[str]:
        return {name for name in self.quantizers if name.endswith(".weight")}

    def static_quantizers(self, kind: str) -> dict[str, FakeQuantizer]:
        """Static quantizers of ``kind`` (``weight`` or ``activation``) by tensor name."""
        return {n: q for n, q in self.quantizers.items()
                if q.static and (n.endswith(".weight") == (kind == "weight"))}

    def scales(self) -> list[nn.Parameter]:
        return [q.scale for q in distinct(self.quantizers.values()) if q.scale is not None and q.scale.requires_grad]

    def uncalibrated_weights(self, model: nn.Module) -> list[str]:
        """This plugin's static weight quantizers of ``model`` that are not yet initialized (reads flags only)."""
        return [name for name, quantizer in quantizers_of(model).items()
                if name in self.quantizers and name.endswith(".weight") and quantizer.static
                and not quantizer.is_initialized]

    @torch.no_grad()
    def init_weight_quantizers(self, model: nn.Module) -> None:
        """Calibrate every static weight quantizer that is not yet initialized from its weight (the observer on
        the weight; round to nearest). Under FSDP call it inside :func:`~framework.sharding.full_parameters` with
        ``writeback`` (it reads weights and writes scales)."""
        quantizers = quantizers_of(model)
        for name in self.uncalibrated_weights(model):
            module, _ = quantized_module(model, name)
            quantizers[name].calibrate(module.weight.detach())

    # ------------------------------------------------------------------ results
    config_name = "quantization"

    @override
    def config_echo(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.to_dict(),
                "activations": None if self.activations is None else self.activations.to_dict(),
                "activation_points": self.activation_points, "runtime": self.runtime, "plan": self.planned_bits,
                "shared_inputs": self.shared_inputs}

    def weight_bits(self) -> float:
        """Average bits per quantized weight (weighted by size)."""
        sizes = {n: q.shape for n, q in self.quantizers.items() if n.endswith(".weight")}
        total = sum(torch.Size(s).numel() for s in sizes.values())
        bits = sum(torch.Size(s).numel() * self.quantizers[n].spec.bits for n, s in sizes.items())
        return bits / total if total else 0.0

    @override
    def summary(self, model: nn.Module) -> dict[str, float | int | str]:
        weights = [n for n in self.quantizers if n.endswith(".weight")]
        activations = distinct(q for n, q in self.quantizers.items() if not n.endswith(".weight"))
        shared = len(self.quantizers) - len(distinct(self.quantizers.values()))
        return {
            "quantizers": len(self.quantizers) - shared,
            **({"shared_tensors": shared} if shared else {}),
            "weight_quantizers": len(weights),
            "activation_quantizers": len(activations),
            "weight_bits": self.weight_bits(),
            "activation_bits": (sum(q.spec.bits for q in activations) / len(activations)) if activations else 0.0,
            "calibrated": int(all(q.is_initialized for q in self.quantizers.values() if q.static)),
            **({"plan": self.plan} if self.plan is not None else {}),
            **({"top1_agreement": self.last_agreement} if self.last_agreement is not None else {}),
            **({"top1_agreement_decided": self.last_agreement_decided}
               if self.last_agreement_decided is not None else {}),
            **({"near_tie_share": self.last_near_tie_share} if self.last_near_tie_share is not None else {}),
            **({"float_reference": self.float_reference} if self.float_reference is not None else {}),
        }

    # ------------------------------------------------------------------ agreement with the float model
    def reference_model(self, like: nn.Module) -> nn.Module:
        """The float model of ``float_reference``, loaded once, on ``like``'s device, frozen, in eval mode.

        Raises:
            FileNotFoundError / ValueError: from loading, prefixed with the key.
        """
        if self._reference_model is None:
            from framework.models import load_vlm

            try:
                model = load_vlm(self.float_reference).model
            except (FileNotFoundError, ValueError, OSError) as err:
                raise type(err)(f"{type(self).__name__}.float_reference: {err}") from err
            # The same batch must be a valid input of both.
            if unsharded_class(model).__name__ != unsharded_class(like).__name__:
                raise ValueError(f"{type(self).__name__}.float_reference: {self.float_reference} is a "
                                 f"{type(model).__name__}, the trained model a {unsharded_class(like).__name__}")
            param = next(like.parameters())
            self._reference_model = model.to(param.device).eval().requires_grad_(False)
        return self._reference_model

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reference_model": None}  # copies reload it rather than clone a whole model

    @torch.no_grad()
    def update_agreement(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any]) -> None:
        """Top-1 agreement of this batch's answer positions, quantized vs. float: the same model with quantizers
        off, or the ``float_reference`` model (for QAT, whose weights moved away from the float model's)."""
        if not any(q.enabled for q in self.quantizers.values()) or "labels" not in batch:
            return
        model, inputs = pl_module.model, {**model_inputs(batch, labels=False), "use_cache": False}
        # The model runs outside the trainer's forward: under FSDP it needs its whole parameters.
        with full_parameters(trainer), trainer.precision_plugin.forward_context():
            quantized = model(**inputs).logits
            if self.float_reference is None:
                with quantization_disabled(model):
                    reference = model(**inputs).logits
            else:
                reference = self.reference_model(model)(**inputs).logits
        if reference.shape != quantized.shape:
            raise ValueError(f"{type(self).__name__}.float_reference: {self.float_reference} gives logits of shape "
                             f"{tuple(reference.shape)}, the trained model {tuple(quantized.shape)}")
        # logits[:, t] predicts labels[:, t + 1]: count the positions that predict an answer token.
        answer = batch["labels"][:, 1:] != -100
        quantized, reference = quantized[:, :-1].float(), reference[:, :-1].float()
        near_tie = near_ties(reference)
        self.agreement = self.agreement.to(quantized.device)
        self.agreement_decided = self.agreement_decided.to(quantized.device)
        self.near_ties = self.near_ties.to(quantized.device)
        self.agreement.update(quantized, reference, answer)
        self.agreement_decided.update(quantized, reference, answer & ~near_tie)
        if answer.any():
            self.near_ties.update(near_tie[answer].float())

    def log_agreement(self, pl_module: pl.LightningModule) -> None:
        value = self.agreement.compute()
        decided = self.agreement_decided.compute()
        ties = self.near_ties.compute() if self.near_ties.update_count else torch.tensor(float("nan"))
        for metric in (self.agreement, self.agreement_decided, self.near_ties):
            metric.reset()
        if not torch.isnan(value):
            self.last_agreement = float(value)
            self.log_metric(pl_module, "top1_agreement", self.last_agreement, on_step=False, on_epoch=True)
        if not torch.isnan(decided):
            self.last_agreement_decided = float(decided)
            self.log_metric(pl_module, "top1_agreement_decided", self.last_agreement_decided, on_step=False,
                            on_epoch=True)
        if not torch.isnan(ties):
            self.last_near_tie_share = float(ties)
            self.log_metric(pl_module, "near_tie_share", self.last_near_tie_share, on_step=False, on_epoch=True)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.update_agreement(trainer, pl_module, batch)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.update_agreement(trainer, pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_agreement(pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_agreement(pl_module)

    # ------------------------------------------------------------------ export
    @override
    def prepare_export(self, model: nn.Module) -> None:
        names = set(self.quantizers)
        self.init_weight_quantizers(model)  # never calibrated (quantization had not started): round to nearest
        self._export = {
            "encodings": export_encodings(model, names),
            "codes": weight_codes(model, names),
            "bits": {n: q.spec.bits for n, q in self.quantizers.items() if n.endswith(".weight")},
        }
        remove_quantizers(model, bake_weights=True, names=names)

    @override
    def export_artifacts(self, model: nn.Module, directory: Path) -> list[str]:
        if self._export is None:
            raise RuntimeError(f"{self.name}: export_artifacts before prepare_export")
        cached, self._export = self._export, None
        return write_quantized_export(cached["encodings"], cached["codes"], cached["bits"], directory, self.name,
                                      extra={"plugin": type(self).__name__, "weight_bits": self.weight_bits()},
                                      parameters=sum(p.numel() for p in model.parameters()))
