"""Task metrics, all torchmetrics ``Metric`` objects so they accumulate over an epoch and sync across ranks.

- :class:`FieldF1` / :class:`FieldExactMatch`: autofill field extraction ("key: value" lines).
- :class:`FactRecall`: share of reference facts that a caption or call summary mentions.
- ROUGE-L and chrF come from ``torchmetrics.text``.
- :class:`MeanTokenLoss`: teacher-forced token loss (perplexity is its exponential).
- :class:`Top1Agreement`: how often two models' next-token argmax agree (the talk's device-vs-float "top-1
  overlap"); compression plugins use it to compare a compressed model with its float reference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import CHRFScore, ROUGEScore

from framework.data.sample import parse_fields


def _fields(target: dict[str, str] | str) -> dict[str, str]:
    """Fields with lowercase keys and values and single spaces, from a dict or "key: value" text."""
    if isinstance(target, str):
        target = parse_fields(target)
    return {" ".join(k.lower().split()): " ".join(str(v).lower().split()) for k, v in target.items()}


class FieldF1(Metric):
    """Micro F1 over (key, value) pairs of predicted vs reference fields.

    A prediction is text with one ``key: value`` per line, parsed by :func:`framework.data.parse_fields`;
    references are dicts or answer texts. Precision = correct pairs / predicted pairs, recall = correct pairs /
    reference pairs; F1 is 0 when undefined.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("predicted", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("expected", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[dict[str, str] | str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"FieldF1: {len(preds)} predictions but {len(targets)} targets")
        for pred, target in zip(preds, targets):
            got, want = _fields(pred), _fields(target)
            self.correct += sum(1 for k, v in got.items() if want.get(k) == v)
            self.predicted += len(got)
            self.expected += len(want)

    def compute(self) -> Tensor:
        precision = self.correct / self.predicted if self.predicted > 0 else torch.tensor(0.0)
        recall = self.correct / self.expected if self.expected > 0 else torch.tensor(0.0)
        if precision + recall == 0:
            return torch.tensor(0.0)
        return 2 * precision * recall / (precision + recall)


class FieldExactMatch(Metric):
    """Share of samples whose parsed fields equal the reference exactly."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("matched", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[dict[str, str] | str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"FieldExactMatch: {len(preds)} predictions but {len(targets)} targets")
        for pred, target in zip(preds, targets):
            self.matched += float(_fields(pred) == _fields(target))
            self.total += 1

    def compute(self) -> Tensor:
        return self.matched / self.total if self.total > 0 else torch.tensor(0.0)


_PUNCT = re.compile(r"[^\w\s:\-]")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation except ':' and '-', collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class FactRecall(Metric):
    """Share of reference facts found (after :func:`normalize_text`) in the prediction, micro over facts."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("found", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], facts: Sequence[Sequence[str]]) -> None:
        if len(preds) != len(facts):
            raise ValueError(f"FactRecall: {len(preds)} predictions but {len(facts)} fact lists")
        for pred, sample_facts in zip(preds, facts):
            text = f" {normalize_text(pred)} "
            self.found += sum(1 for fact in sample_facts if f" {normalize_text(fact)} " in text)
            self.total += len(sample_facts)

    def compute(self) -> Tensor:
        return self.found / self.total if self.total > 0 else torch.tensor(0.0)


class MeanTokenLoss(Metric):
    """Mean next-token cross-entropy over labelled positions (HF shift: logits[:, t] predict labels[:, t+1])."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits[:, :-1].float()
        labels = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
        )
        self.nll += nll.double()
        self.count += (labels != self.ignore_index).sum().double()

    def compute(self) -> Tensor:
        return (self.nll / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class Top1Agreement(Metric):
    """Share of positions where two models' next-token argmax agree (e.g. quantized vs float).

    ``update(logits_a, logits_b, mask)``: logits ``[..., vocab]`` of the two models on the same inputs; ``mask``
    (bool, the leading shape) selects the positions that count, e.g. answer tokens.
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("agreed", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits_a: Tensor, logits_b: Tensor, mask: Tensor | None = None) -> None:
        if logits_a.shape != logits_b.shape:
            raise ValueError(f"Top1Agreement: logits shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
        same = logits_a.argmax(-1) == logits_b.argmax(-1)
        if mask is not None:
            if mask.shape != same.shape:
                raise ValueError(f"Top1Agreement: mask shape {tuple(mask.shape)} != positions {tuple(same.shape)}")
            same = same[mask.bool()]
        self.agreed += same.sum().double()
        self.total += same.numel()

    def compute(self) -> Tensor:
        return (self.agreed / self.total).float() if self.total > 0 else torch.tensor(float("nan"))


class TaskMetrics(torch.nn.Module):
    """The generation metrics that apply to one task, updated from predictions and sample metadata.

    Built-in tasks: ``autofill`` -> field_f1, exact_match; ``caption`` and ``longcall`` -> fact_recall, rouge_l;
    user tasks -> rouge_l, chrf, plus field_f1 / fact_recall for samples that carry fields / facts.
    """

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task
        self.field_f1 = FieldF1()
        self.exact_match = FieldExactMatch()
        self.fact_recall = FactRecall()
        self.rouge = ROUGEScore(rouge_keys="rougeL", accumulate="avg")
        self.chrf = CHRFScore()
        self.used: set[str] = set()

    @property
    def update_called(self) -> bool:
        return bool(self.used)

    def update(self, preds: Sequence[str], samples: Sequence[dict[str, Any]]) -> None:
        """``samples``: dicts with ``answer`` and optional ``fields`` / ``facts``."""
        with_fields = [(p, s["fields"]) for p, s in zip(preds, samples) if s.get("fields")]
        with_facts = [(p, s["facts"]) for p, s in zip(preds, samples) if s.get("facts")]
        if self.task == "autofill" or (self.task not in ("caption", "longcall") and with_fields):
            if with_fields:
                self.field_f1.update(*zip(*with_fields))
                self.exact_match.update(*zip(*with_fields))
                self.used |= {"field_f1", "exact_match"}
        if self.task != "autofill" and with_facts:
            self.fact_recall.update(*zip(*with_facts))
            self.used.add("fact_recall")
        if self.task != "autofill":
            self.rouge.update(list(preds), [s["answer"] for s in samples])
            self.used.add("rouge_l")
        if self.task not in ("autofill", "caption", "longcall"):
            self.chrf.update(list(preds), [[s["answer"]] for s in samples])
            self.used.add("chrf")

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "field_f1" in self.used:
            out["field_f1"] = self.field_f1.compute()
            out["exact_match"] = self.exact_match.compute()
        if "fact_recall" in self.used:
            out["fact_recall"] = self.fact_recall.compute()
        if "rouge_l" in self.used:
            out["rouge_l"] = self.rouge.compute()["rougeL_fmeasure"]
        if "chrf" in self.used:
            out["chrf"] = self.chrf.compute()
        return out

    def reset(self) -> None:
        for metric in (self.field_f1, self.exact_match, self.fact_recall, self.rouge, self.chrf):
            metric.reset()
        self.used = set()
