"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from framework.metrics import (
    FactRecall,
    FieldExactMatch,
    FieldF1,
    MeanTokenLoss,
    TaskMetrics,
    Top1Agreement,
    normalize_text,
)


def test_field_f1_by_hand() -> None:
    metric = FieldF1()
    # Predicted pairs: name (right), id (wrong), city (right) -> 3 predicted, 2 correct.
    # Reference pairs: name, id, city, type -> 4. P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7.
    metric.update(["name: Anna  Lee\nid: 123\ncity: osaka"],
                  [{"name": "anna lee", "id": "124", "city": "Osaka", "type": "id card"}])
    assert metric.compute().item() == pytest.approx(4 / 7)


def test_field_f1_accumulates_like_one_update() -> None:
    preds = ["a: 1\nb: 2", "a: 1", "garbage without fields", "c: 3\nc: 4"]
    targets = ["a: 1\nb: 3", "a: 1\nb: 2", "a: 1", {"c": "3"}]
    one, many = FieldF1(), FieldF1()
    one.update(preds, targets)
    for p, t in zip(preds, targets):
        many.update([p], [t])
    # correct: 1 + 1 + 0 + 1 (first c wins) = 3; predicted 2+1+0+1 = 4; expected 2+2+1+1 = 6.
    # P = 3/4, R = 1/2, F1 = 2 * 3/8 / (5/4) = 3/5.
    assert one.compute().item() == pytest.approx(0.6)
    assert many.compute().item() == pytest.approx(0.6)


def test_field_f1_empty_is_zero_and_length_mismatch_raises() -> None:
    assert FieldF1().compute().item() == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        FieldF1().update(["a: 1", "b: 2"], ["a: 1"])


def test_exact_match() -> None:
    metric = FieldExactMatch()
    metric.update(["a: 1\nb: 2", "b: 2\na: 1", "a: 1"], ["a: 1\nb: 2", {"a": "1", "b": "2"}, "a: 1\nb: 2"])
    assert metric.compute().item() == pytest.approx(2 / 3)  # order does not matter; a missing field does


def test_time_values_keep_their_colons() -> None:
    metric = FieldF1()
    metric.update(["appointment: friday 3:30 pm"], [{"appointment": "friday 3:30 pm"}])
    assert metric.compute().item() == 1.0


def test_fact_recall_by_hand() -> None:
    metric = FactRecall()
    # 2 of 3 facts in the first answer, 1 of 1 in the second -> 3/4.
    metric.update(
        ["A red circle at the top left, and a blue square!", "order: 48213"],
        [["red circle at the top left", "blue square", "green star"], ["order: 48213"]],
    )
    assert metric.compute().item() == pytest.approx(0.75)
    # Whole words only: "order: 4821" is not found inside "order: 48213".
    partial = FactRecall()
    partial.update(["order: 48213"], [["order: 4821"]])
    assert partial.compute().item() == 0.0
    assert normalize_text("  Hello,   World: 3-4! ") == "hello world: 3-4"


def test_mean_token_loss_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    metric = MeanTokenLoss()
    metric.update(logits[:1], labels[:1])
    metric.update(logits[1:], labels[1:])
    # Positions t predict labels t+1: row 0 uses logits 1..3 for labels 3, 4, 1; row 1 uses logits 0..1 for 2, 2.
    terms = [
        -torch.log_softmax(logits[0, 1], -1)[3], -torch.log_softmax(logits[0, 2], -1)[4],
        -torch.log_softmax(logits[0, 3], -1)[1], -torch.log_softmax(logits[1, 0], -1)[2],
        -torch.log_softmax(logits[1, 1], -1)[2],
    ]
    assert metric.compute().item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_top1_agreement_with_mask() -> None:
    a = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # argmax 1, 0, 1
    b = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [0.0, 1.0]]])  # argmax 1, 1, 1
    metric = Top1Agreement()
    metric.update(a, b)
    assert metric.compute().item() == pytest.approx(2 / 3)
    masked = Top1Agreement()
    masked.update(a, b, mask=torch.tensor([[True, False, True]]))
    assert masked.compute().item() == 1.0
    with pytest.raises(ValueError, match=r"logits shapes differ: \(1, 3, 2\) vs \(1, 2, 2\)"):
        metric.update(a, b[:, :2])
    assert math.isnan(Top1Agreement().compute().item())


def test_states_sum_across_ranks() -> None:
    for metric in (FieldF1(), FieldExactMatch(), FactRecall(), MeanTokenLoss(), Top1Agreement()):
        assert metric._reductions and all(fn is not None for fn in metric._reductions.values())


def test_task_metrics_choose_by_task() -> None:
    autofill = TaskMetrics("autofill")
    autofill.update(["type: id card\nname: anna lee"], [{"answer": "", "fields": {"type": "id card", "name": "ann"}}])
    values = autofill.compute()
    assert set(values) == {"field_f1", "exact_match"}
    assert values["field_f1"].item() == pytest.approx(0.5) and values["exact_match"].item() == 0.0

    caption = TaskMetrics("caption")
    caption.update(["a red circle on the left"], [{"answer": "a red circle on the left", "facts": ["red circle on the left"]}])
    values = caption.compute()
    assert set(values) == {"fact_recall", "rouge_l"}
    assert values["fact_recall"].item() == 1.0 and values["rouge_l"].item() == pytest.approx(1.0)

    user = TaskMetrics("my_data")
    # ROUGE-L by hand: LCS of "the cat sat" and "the cat sat down" is 3 words: P = 1, R = 3/4, F = 6/7.
    user.update(["the cat sat"], [{"answer": "the cat sat down"}])
    values = user.compute()
    assert set(values) == {"rouge_l", "chrf"}
    assert values["rouge_l"].item() == pytest.approx(6 / 7, rel=1e-4)
    user.reset()
    assert not user.update_called and user.compute() == {}
