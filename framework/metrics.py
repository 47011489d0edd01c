"""Metrics for compressed VLMs, built on torchmetrics.

Generation quality per task (field F1 and exact match for autofill, fact recall and ROUGE-L for captions and
call summaries, ROUGE-L and chrF for user data), language-model fit (mean token loss, perplexity) and the
agreement of a compressed model with its float reference (top-1 agreement). Every metric keeps its state as
``add_state`` tensors with a ``dist_reduce_fx``, so values are exact under DDP.

A LightningModule keeps one :class:`TaskMetrics` per task::

    self.gen_metrics = nn.ModuleDict({task: TaskMetrics(task) for task in tasks})
    ...
    self.gen_metrics[task].update(generated_texts, batch["samples"])  # dicts with answer / fields / facts
    ...
    for name, value in self.gen_metrics[task].compute().items():  # every rank calls compute
        self.log(f"val/{task}/{name}", value)
    self.gen_metrics[task].reset()
"""

from __future__ import annotations

import string
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.text import edit_distance
from torchmetrics.text import CharErrorRate, CHRFScore, Perplexity, ROUGEScore

__all__ = [
    "IGNORE_INDEX",
    "OTHER_TASK_METRICS",
    "OTHER_TASK_OPTIONAL_METRICS",
    "TASK_METRICS",
    "FactRecall",
    "FieldAccuracy",
    "FieldCharErrorRate",
    "FieldExactMatch",
    "FieldF1",
    "MeanTokenLoss",
    "RougeL",
    "TaskMetrics",
    "TokenPerplexity",
    "Top1Agreement",
    "normalize_text",
    "parse_fields",
]

IGNORE_INDEX = -100
"""Label value that marks tokens without a loss (prompt, padding, image tokens), as in Hugging Face."""


# ---------------------------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------------------------


def _collapse(text: str) -> str:
    """Lowercases ``text``, strips it and collapses every whitespace run to one space."""
    return " ".join(text.split()).lower()


def parse_fields(text: str) -> dict[str, str]:
    """Parses ``key: value`` lines into a normalised field dict.

    Each line is split on its first ``':'`` (so ``"time: 3:30 pm"`` gives ``{"time": "3:30 pm"}``); key and value
    are stripped, lowercased and their internal whitespace collapsed. Lines without ``':'`` and lines with an
    empty key are ignored. When a key repeats (after normalisation), the first occurrence wins. This is
    :func:`framework.data.parse_fields` plus the normalisation used for scoring.

    Args:
        text: Model output or reference answer, one field per line.

    Returns:
        The fields, in the order they first appear.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        key = _collapse(key)
        if key and key not in fields:
            fields[key] = _collapse(value)
    return fields


def _normalize_field_dict(fields: Mapping[str, Any]) -> dict[str, str]:
    """Applies the normalisation of :func:`parse_fields` to an already structured field dict."""
    out: dict[str, str] = {}
    for key, value in fields.items():
        norm_key = _collapse(str(key))
        if norm_key and norm_key not in out:
            out[norm_key] = _collapse(str(value))
    return out


def _as_fields(target: Mapping[str, Any] | str) -> dict[str, str]:
    """Turns a reference (field dict or ``key: value`` answer text) into a normalised field dict."""
    if isinstance(target, str):
        return parse_fields(target)
    if isinstance(target, Mapping):
        return _normalize_field_dict(target)
    raise TypeError(f"A field target must be a dict or a 'key: value' string, got {type(target).__name__}.")


_KEPT_PUNCTUATION = frozenset(":-")


def _is_removed_punctuation(char: str) -> bool:
    """Whether ``char`` is punctuation (ASCII or Unicode category P*) other than ``':'`` and ``'-'``."""
    if char in _KEPT_PUNCTUATION:
        return False
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_text(text: str) -> str:
    """Normalises text for fact matching.

    Lowercases, deletes punctuation except ``':'`` and ``'-'`` (so ``"3:30 p.m."`` becomes ``"3:30 pm"`` and
    ``"follow-up"`` stays), and collapses whitespace.

    Args:
        text: Prediction or reference fact.

    Returns:
        The normalised text.
    """
    kept = "".join(char for char in text.lower() if not _is_removed_punctuation(char))
    return " ".join(kept.split())


def _check_same_length(preds: Sequence[Any], targets: Sequence[Any], targets_name: str) -> None:
    if isinstance(preds, str):
        raise TypeError("`preds` must be a list of strings, got a single string.")
    if len(preds) != len(targets):
        raise ValueError(f"Got {len(preds)} predictions but {len(targets)} {targets_name}; they must match.")


# ---------------------------------------------------------------------------------------------------------------
# Generation metrics
# ---------------------------------------------------------------------------------------------------------------


class FieldF1(Metric):
    """Micro F1 over ``(key, value)`` fields, for autofill.

    Predictions and string targets are parsed with :func:`parse_fields`; dict targets get the same
    normalisation. A predicted pair is a true positive when the target has the same key with the same value.
    Over everything seen since the last reset, precision = TP / predicted pairs and recall = TP / target pairs,
    so F1 = 2 TP / (predicted pairs + target pairs); it is 0 when undefined (no pairs at all).

    Example:
        >>> metric = FieldF1()
        >>> metric.update(["name: Ada\\ncity: Paris"], [{"name": "ada", "city": "London"}])
        >>> round(float(metric.compute()), 4)
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    true_positives: Tensor
    predicted_pairs: Tensor
    target_pairs: Tensor
    samples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            **kwargs: Passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).
        """
        super().__init__(**kwargs)
        for name in ("true_positives", "predicted_pairs", "target_pairs", "samples"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[Mapping[str, str] | str]) -> None:
        """Accumulates one batch.

        Args:
            preds: Generated texts, one ``key: value`` per line.
            targets: Reference field dicts or reference answer texts, one per prediction.

        Raises:
            ValueError: If ``preds`` and ``targets`` differ in length.
        """
        _check_same_length(preds, targets, "targets")
        true_positives = predicted = reference = 0
        for pred, target in zip(preds, targets):
            pred_fields, target_fields = parse_fields(pred), _as_fields(target)
            true_positives += sum(target_fields.get(key) == value for key, value in pred_fields.items())
            predicted += len(pred_fields)
            reference += len(target_fields)
        self.true_positives += true_positives
        self.predicted_pairs += predicted
        self.target_pairs += reference
        self.samples += len(preds)

    def compute(self) -> Tensor:
        """Returns the micro F1 in [0, 1]."""
        denominator = self.predicted_pairs + self.target_pairs
        if denominator == 0:
            return torch.tensor(0.0, device=self.true_positives.device)
        return 2 * self.true_positives.float() / denominator.float()


class FieldExactMatch(Metric):
    """Fraction of samples whose parsed field dict equals the target's exactly, for autofill.

    Parsing and normalisation are those of :class:`FieldF1`; field order does not matter. 0 before any sample.

    Example:
        >>> metric = FieldExactMatch()
        >>> metric.update(["city: Paris\\nname: Ada", "name: Bob"], ["name: ada\\ncity: paris", "name: Rob"])
        >>> float(metric.compute())
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    matches: Tensor
    samples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            **kwargs: Passed to :class:`torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        self.add_state("matches", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[Mapping[str, str] | str]) -> None:
        """Accumulates one batch.

        Args:
            preds: Generated texts, one ``key: value`` per line.
            targets: Reference field dicts or reference answer texts, one per prediction.

        Raises:
            ValueError: If ``preds`` and ``targets`` differ in length.
        """
        _check_same_length(preds, targets, "targets")
        self.matches += sum(parse_fields(pred) == _as_fields(target) for pred, target in zip(preds, targets))
        self.samples += len(preds)

    def compute(self) -> Tensor:
        """Returns the exact-match rate in [0, 1]."""
        if self.samples == 0:
            return torch.tensor(0.0, device=self.matches.device)
        return self.matches.float() / self.samples.float()


class _PerFieldMetric(Metric):
    """Base of the per-key field metrics: ``keys`` and their order, the matching of target fields to predicted
    ones, and ``compute`` as the ratio of two per-key count states (``_states``: numerator, denominator)."""

    is_differentiable = False
    full_state_update = False
    _states: tuple[str, str] = ("", "")

    def __init__(self, keys: Sequence[str] | None = None, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            keys: Field keys to report (normalised like the fields); default: the built-in autofill task's keys,
                ``type`` first.
            **kwargs: Passed to :class:`torchmetrics.Metric`.

        Raises:
            ValueError: If ``keys`` is empty or has duplicates after normalisation.
        """
        super().__init__(**kwargs)
        if keys is None:
            from framework.data.tasks import CARD_TYPES

            keys = ["type", *dict.fromkeys(key for fields, _ in CARD_TYPES.values() for key in fields)]
        self.keys = [_collapse(str(key)) for key in keys]
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"{type(self).__name__} keys must be non-empty and distinct, got {list(keys)!r}")
        self._index = {key: i for i, key in enumerate(self.keys)}
        for name in self._states:
            self.add_state(name, default=torch.zeros(len(self.keys), dtype=torch.long), dist_reduce_fx="sum")

    def _keyed_fields(self, preds: Sequence[str],
                      targets: Sequence[Mapping[str, str] | str]) -> list[tuple[int, str | None, str]]:
        """``(key index, predicted value or None, reference value)`` for every target field with a reported key."""
        _check_same_length(preds, targets, "targets")
        keyed = []
        for pred, target in zip(preds, targets):
            pred_fields = parse_fields(pred)
            for key, value in _as_fields(target).items():
                index = self._index.get(key)
                if index is not None:
                    keyed.append((index, pred_fields.get(key), value))
        return keyed

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        """Returns ``{key: value}`` (NaN for a key no target had)."""
        numerator, denominator = (getattr(self, name) for name in self._states)
        values = numerator.float() / denominator.float()  # 0/0 -> NaN
        return dict(zip(self.keys, values.tolist()))


class FieldAccuracy(_PerFieldMetric):
    """Per-key recall of ``(key, value)`` fields, for autofill: which fields a model gets wrong.

    For each key of ``keys`` (default: the built-in autofill task's keys, ``type`` first), the share of the target
    fields with that key whose value the prediction has under the same key (parsing and normalisation as
    :class:`FieldF1`). Keys outside ``keys`` are not counted; a key no target had is reported as NaN.
    :meth:`compute` returns ``{key: value}``.

    Example:
        >>> metric = FieldAccuracy(["name", "id"])
        >>> metric.update(["name: ada\\nid: 123", "name: bob\\nid: 99"], [{"name": "ada", "id": "124"},
        ...                                                                {"name": "bob", "id": "99"}])
        >>> {k: round(v, 2) for k, v in metric.compute().items()}
        {'name': 1.0, 'id': 0.5}
    """

    higher_is_better = True
    _states = ("correct", "total")

    correct: Tensor
    total: Tensor

    def update(self, preds: Sequence[str], targets: Sequence[Mapping[str, str] | str]) -> None:
        """Accumulates one batch (see :meth:`FieldF1.update`)."""
        correct = [0] * len(self.keys)
        total = [0] * len(self.keys)
        for index, predicted, reference in self._keyed_fields(preds, targets):
            total[index] += 1
            correct[index] += predicted == reference
        self.correct += torch.tensor(correct, device=self.correct.device)
        self.total += torch.tensor(total, device=self.total.device)


class FieldCharErrorRate(_PerFieldMetric):
    """Per-key character error rate of ``(key, value)`` fields, for autofill: how far a wrong field is from right.

    For each key of ``keys`` (as for :class:`FieldAccuracy`), the Levenshtein distance between the predicted and
    the reference value (a key the prediction lacks counts as an empty value) summed over samples, divided by the
    summed reference lengths. Field recall (:class:`FieldAccuracy`) scores an 8-digit id as wrong until all eight
    digits are; this shows whether the digits are being learned (1.0: nothing right, 0.0: all right) long before
    whole fields are. Parsing and normalisation as :class:`FieldF1`; a key no target had is NaN. :meth:`compute`
    returns ``{key: value}``.

    Example:
        >>> metric = FieldCharErrorRate(["name", "id"])
        >>> metric.update(["name: ada\\nid: 1234", "name: bob"], [{"name": "ada", "id": "1244"},
        ...                                                       {"name": "bob", "id": "99"}])
        >>> {k: round(v, 3) for k, v in metric.compute().items()}
        {'name': 0.0, 'id': 0.5}
    """

    higher_is_better = False
    _states = ("errors", "chars")

    errors: Tensor
    chars: Tensor

    def update(self, preds: Sequence[str], targets: Sequence[Mapping[str, str] | str]) -> None:
        """Accumulates one batch (see :meth:`FieldF1.update`)."""
        keyed = self._keyed_fields(preds, targets)
        if not keyed:
            return
        indices, predicted, references = zip(*keyed)
        index = torch.tensor(indices, device=self.errors.device)
        errors = edit_distance([p or "" for p in predicted], list(references), reduction="none").to(self.errors)
        lengths = torch.tensor([len(reference) for reference in references], device=self.chars.device)
        self.errors.index_add_(0, index, errors)
        self.chars.index_add_(0, index, lengths)


class FactRecall(Metric):
    """Fraction of reference facts found in the generated text, micro-averaged over facts.

    Prediction and facts are normalised with :func:`normalize_text`; a fact counts as recalled when it is a
    substring of the normalised prediction that starts and ends at word boundaries (``"order: 4821"`` is not
    found in ``"order: 48213"``). Facts that normalise to an empty string are skipped. 0 when no fact has been
    seen.

    Example:
        >>> metric = FactRecall()
        >>> metric.update(["Call at 3:30 p.m. with Dr. Lee."], [["3:30 pm", "Dr Lee", "Friday"]])
        >>> round(float(metric.compute()), 4)
        0.6667
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    recalled: Tensor
    facts: Tensor
    samples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            **kwargs: Passed to :class:`torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        for name in ("recalled", "facts", "samples"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], facts: Sequence[Sequence[str]]) -> None:
        """Accumulates one batch.

        Args:
            preds: Generated texts.
            facts: For each prediction, the list of reference facts it should contain.

        Raises:
            ValueError: If ``preds`` and ``facts`` differ in length.
        """
        _check_same_length(preds, facts, "fact lists")
        recalled = total = 0
        for pred, sample_facts in zip(preds, facts):
            if isinstance(sample_facts, str):
                raise TypeError("Each entry of `facts` must be a list of strings, got a single string.")
            text = f" {normalize_text(pred)} "
            normalized = [fact for fact in map(normalize_text, sample_facts) if fact]
            recalled += sum(f" {fact} " in text for fact in normalized)
            total += len(normalized)
        self.recalled += recalled
        self.facts += total
        self.samples += len(preds)

    def compute(self) -> Tensor:
        """Returns the fact recall in [0, 1]."""
        if self.facts == 0:
            return torch.tensor(0.0, device=self.recalled.device)
        return self.recalled.float() / self.facts.float()


class RougeL(ROUGEScore):
    """ROUGE-L F-measure as a single tensor (``torchmetrics.text.ROUGEScore(rouge_keys="rougeL")``).

    Uses torchmetrics' default normalisation: lowercase, every run of characters other than ``[a-z0-9]`` becomes
    a space, so non-Latin text scores near 0 here; chrF (:class:`torchmetrics.text.CHRFScore`) covers it.
    The score is the mean of the per-sample F-measures.
    """

    def __init__(self, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            **kwargs: Passed to :class:`~torchmetrics.text.ROUGEScore` (``use_stemmer``, ``normalizer``, ...),
                except ``rouge_keys``, which is fixed to ``"rougeL"``.
        """
        super().__init__(rouge_keys="rougeL", **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        """Returns the mean ROUGE-L F-measure in [0, 1]."""
        return super().compute()["rougeL_fmeasure"]


# ---------------------------------------------------------------------------------------------------------------
# Language-model metrics
# ---------------------------------------------------------------------------------------------------------------


def _shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Aligns HF causal-LM outputs with their labels: ``logits[:, :-1]`` predict ``labels[:, 1:]``.

    Raises:
        ValueError: If the shapes are not ``[batch, seq, vocab]`` and ``[batch, seq]``.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            "Expected logits [batch, seq, vocab] and labels [batch, seq], "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    return logits[:, :-1, :], labels[:, 1:]


class MeanTokenLoss(Metric):
    """Mean next-token negative log-likelihood over labelled tokens, as a Hugging Face causal LM computes it.

    ``logits[:, :-1]`` predict ``labels[:, 1:]``; tokens labelled ``ignore_index`` do not count. The loss is
    summed in float32 with ``log_softmax`` (via ``cross_entropy``), so ``exp(compute())`` is a numerically safe
    perplexity. NaN when no token has been seen.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    loss_sum: Tensor
    tokens: Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            ignore_index: Label value of tokens without a loss.
            **kwargs: Passed to :class:`torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("loss_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Accumulates one batch.

        Args:
            logits: ``[batch, seq, vocab]`` model outputs, unshifted.
            labels: ``[batch, seq]`` token ids (the input ids with ``ignore_index`` where no loss applies).

        Raises:
            ValueError: If the shapes do not match.
        """
        logits, labels = _shift_for_causal_lm(logits, labels)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        self.loss_sum += loss.detach().to(self.loss_sum.dtype)
        self.tokens += (labels != self.ignore_index).sum()

    def compute(self) -> Tensor:
        """Returns the mean loss per labelled token."""
        if self.tokens == 0:
            return torch.tensor(float("nan"), device=self.loss_sum.device)
        return self.loss_sum / self.tokens.float()


class TokenPerplexity(Perplexity):
    """torchmetrics :class:`~torchmetrics.text.Perplexity` on HF causal-LM outputs.

    Applies the causal shift (``logits[:, :-1]`` predict ``labels[:, 1:]``), casts logits to float32 and skips
    ``ignore_index`` labels. torchmetrics takes ``log(softmax(.))``, which overflows to ``inf`` when a label's
    probability underflows; ``exp(MeanTokenLoss)`` gives the same number without that risk.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            ignore_index: Label value of tokens without a loss.
            **kwargs: Passed to :class:`~torchmetrics.text.Perplexity`.
        """
        super().__init__(ignore_index=ignore_index, **kwargs)

    def update(self, logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Accumulates one batch.

        Args:
            logits: ``[batch, seq, vocab]`` model outputs, unshifted.
            labels: ``[batch, seq]`` token ids with ``ignore_index`` where no loss applies.

        Raises:
            ValueError: If the shapes do not match.
        """
        logits, labels = _shift_for_causal_lm(logits, labels)
        super().update(logits.float(), labels.long())


class Top1Agreement(Metric):
    """Fraction of positions where two models' most likely tokens agree (device vs. float "top-1 overlap").

    Both models see the same inputs; ``argmax`` over the last dimension is compared at every position where
    ``mask`` is true. NaN when no position has been counted.

    Example:
        >>> metric = Top1Agreement()
        >>> a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
        >>> b = torch.tensor([[[0.0, 2.0], [0.0, 1.0]]])
        >>> float(metric(a, b))
        0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    agreed: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Creates the metric.

        Args:
            **kwargs: Passed to :class:`torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        self.add_state("agreed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits_a: Tensor, logits_b: Tensor, mask: Tensor | None = None) -> None:
        """Accumulates one batch.

        Args:
            logits_a: ``[..., vocab]`` logits (or log-probabilities) of the first model.
            logits_b: Logits of the second model, same shape.
            mask: Positions to count, shape ``logits_a.shape[:-1]``, bool (or 0/1); ``None`` counts all.

        Raises:
            ValueError: If the two logits or the mask have mismatched shapes.
        """
        if logits_a.shape != logits_b.shape:
            raise ValueError(
                f"Top1Agreement needs logits of one shape, got logits_a {tuple(logits_a.shape)} "
                f"and logits_b {tuple(logits_b.shape)}."
            )
        agree = logits_a.argmax(dim=-1) == logits_b.argmax(dim=-1)
        if mask is None:
            self.agreed += agree.sum()
            self.total += agree.numel()
            return
        if mask.shape != agree.shape:
            raise ValueError(
                f"Top1Agreement mask must have shape {tuple(agree.shape)} (logits without the vocab dimension), "
                f"got {tuple(mask.shape)}."
            )
        mask = mask.to(device=agree.device, dtype=torch.bool)
        self.agreed += (agree & mask).sum()
        self.total += mask.sum()

    def compute(self) -> Tensor:
        """Returns the agreement rate in [0, 1]."""
        if self.total == 0:
            return torch.tensor(float("nan"), device=self.agreed.device)
        return self.agreed.float() / self.total.float()


# ---------------------------------------------------------------------------------------------------------------
# Per-task collection
# ---------------------------------------------------------------------------------------------------------------

# Metric name -> (class, keys of a sample's meta that give its reference, first present wins).
_METRICS: dict[str, tuple[type[Metric], tuple[str, ...]]] = {
    "field_f1": (FieldF1, ("fields", "answer")),
    "exact_match": (FieldExactMatch, ("fields", "answer")),
    "fact_recall": (FactRecall, ("facts",)),
    "fields": (FieldAccuracy, ("fields", "answer")),
    "field_cer": (FieldCharErrorRate, ("fields", "answer")),
    "rouge_l": (RougeL, ("answer",)),
    "chrf": (CHRFScore, ("answer",)),
    "cer": (CharErrorRate, ("answer",)),
}

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "autofill": ("field_f1", "exact_match", "fields", "field_cer"),
    "caption": ("fact_recall", "rouge_l"),
    "longcall": ("fact_recall", "rouge_l"),
    "reading": ("cer", "chrf"),
}
"""Metrics of the built-in synthetic tasks."""

OTHER_TASK_METRICS: tuple[str, ...] = ("rouge_l", "chrf")
"""Metrics of any other task (user JSONL data)."""

OTHER_TASK_OPTIONAL_METRICS: dict[str, str] = {"field_f1": "fields", "fact_recall": "facts"}
"""For other tasks: metrics computed on the samples whose meta has the given key, reported when any sample had it."""

_NO_UPDATE_WARNING = r".*was called before the ``update`` method.*"


class TaskMetrics(nn.Module):
    """The generation metrics that apply to one task, fed with generated texts and sample metadata.

    ========== ========================================================================================
    task       metrics (names of :meth:`compute`'s keys)
    ========== ========================================================================================
    autofill   ``field_f1``, ``exact_match``, ``fields/<key>`` (:class:`FieldAccuracy`, one per field key),
               ``field_cer/<key>`` (:class:`FieldCharErrorRate`); reference: ``fields``, else ``answer``
               parsed as fields
    caption    ``fact_recall`` (``facts``), ``rouge_l`` (``answer``)
    longcall   ``fact_recall`` (``facts``), ``rouge_l`` (``answer``)
    reading    ``cer`` (character error rate, lower is better), ``chrf`` (``answer``)
    other      ``rouge_l``, ``chrf`` (``answer``); plus ``field_f1`` / ``fact_recall`` on the samples that
               have ``fields`` / ``facts``, reported when any sample (on any rank) had them
    ========== ========================================================================================

    It is an ``nn.Module`` of torchmetrics metrics, so it moves with the LightningModule that holds it (e.g. in
    an ``nn.ModuleDict`` keyed by task) and each metric syncs its own states across ranks in :meth:`compute`.
    Every rank must call :meth:`compute` together.

    Example:
        >>> metrics = TaskMetrics("autofill")
        >>> metrics.update(["name: Ada\\ncity: Paris"], [{"fields": {"name": "Ada", "city": "Paris"}}])
        >>> values = metrics.compute()
        >>> values["field_f1"], values["exact_match"], values["fields/name"], values["fields/city"]
        (1.0, 1.0, 1.0, 1.0)
    """

    def __init__(self, task: str) -> None:
        """Creates the metrics of ``task``.

        Args:
            task: Task name; ``autofill``, ``caption`` and ``longcall`` are built in, any other name gets the
                metrics for free-form answers.

        Raises:
            ValueError: If ``task`` is empty.
        """
        super().__init__()
        if not isinstance(task, str) or not task:
            raise ValueError(f"TaskMetrics `task` must be a non-empty string, got {task!r}.")
        self.task = task
        if task in TASK_METRICS:
            names, self._optional = TASK_METRICS[task], {}
        else:
            names, self._optional = OTHER_TASK_METRICS, dict(OTHER_TASK_OPTIONAL_METRICS)
        self.metrics = nn.ModuleDict({name: _METRICS[name][0]() for name in (*names, *self._optional)})

    @property
    def update_called(self) -> bool:
        """Whether any metric has been updated since the last reset (on this rank)."""
        return any(metric.update_called for metric in self.metrics.values())

    @property
    def names(self) -> tuple[str, ...]:
        """The task's metrics (optional ones come after them when present); a per-key metric (``fields``)
        reports one value per key, as ``fields/<key>`` (``field_cer/<key>``)."""
        return tuple(name for name in self.metrics if name not in self._optional)

    def update(self, preds: Sequence[str], samples_meta: Sequence[Mapping[str, Any]]) -> None:
        """Accumulates one batch of generations.

        Args:
            preds: Generated texts, one per sample.
            samples_meta: One dict per sample with the optional keys ``"answer"`` (reference text), ``"fields"``
                (dict of reference fields) and ``"facts"`` (list of reference facts).

        Raises:
            ValueError: If lengths differ, or a sample lacks the reference a metric of this task needs.
        """
        _check_same_length(preds, samples_meta, "samples_meta entries")
        for name, metric in self.metrics.items():
            if name in self._optional:
                key = self._optional[name]
                chosen = [i for i, meta in enumerate(samples_meta) if meta.get(key) is not None]
                if chosen:
                    metric.update([preds[i] for i in chosen], [samples_meta[i][key] for i in chosen])
                continue
            references = [self._reference(name, meta, index) for index, meta in enumerate(samples_meta)]
            if name == "chrf":
                references = [[reference] for reference in references]
            metric.update(list(preds), references)

    def _reference(self, name: str, meta: Mapping[str, Any], index: int) -> Any:
        keys = _METRICS[name][1]
        for key in keys:
            if meta.get(key) is not None:
                return meta[key]
        raise ValueError(
            f"TaskMetrics({self.task!r}): sample {index} of the batch has none of the keys {list(keys)} "
            f"that metric {name!r} needs; its keys are {sorted(meta)}."
        )

    def compute(self) -> dict[str, float]:
        """Returns ``{metric name: value}`` over everything seen since the last reset (synced across ranks)."""
        results: dict[str, float] = {}
        for name, metric in self.metrics.items():
            if isinstance(metric, _PerFieldMetric):  # one value per key; keys no sample had stay out
                results.update((f"{name}/{key}", value) for key, value in metric.compute().items()
                               if value == value)
            elif name not in self._optional:
                results[name] = float(metric.compute())
            elif _global_sample_count(metric) > 0:
                with warnings.catch_warnings():  # this rank may have seen none of the samples
                    warnings.filterwarnings("ignore", message=_NO_UPDATE_WARNING)
                    results[name] = float(metric.compute())
        return results

    def reset(self) -> None:
        """Clears every metric's state, e.g. at the end of a validation epoch."""
        for metric in self.metrics.values():
            metric.reset()


def _global_sample_count(metric: Metric) -> int:
    """The metric's ``samples`` state summed over ranks (the local value outside distributed runs)."""
    with metric.sync_context(dist_sync_fn=metric.dist_sync_fn, should_sync=metric.sync_on_compute):
        return int(metric.samples)
