"""Metrics against hand-computed values, accumulation, and state sync across ranks."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.text import CHRFScore, ROUGEScore
from torchmetrics.utilities import dim_zero_sum

from framework.metrics import (
    FactRecall,
    FieldExactMatch,
    FieldF1,
    MeanTokenLoss,
    RougeL,
    TaskMetrics,
    TokenPerplexity,
    Top1Agreement,
    normalize_text,
    parse_fields,
)

_NO_UPDATE = "called before the ``update`` method"  # torchmetrics' warning for a metric with no data

# ------------------------------------------------------------------------------------------------ parse_fields


def test_parse_fields_normalises_keys_and_values() -> None:
    assert parse_fields("  Full   Name :  Anna   LEE \nCity:Osaka") == {"full name": "anna lee", "city": "osaka"}


def test_parse_fields_keeps_colons_in_values() -> None:
    # Split on the first ':' only.
    assert parse_fields("time: 3:30 pm\nurl: http://x.org:8080") == {"time": "3:30 pm", "url": "http://x.org:8080"}


def test_parse_fields_first_duplicate_wins() -> None:
    # "NAME" normalises to "name", so it is a duplicate of the first line and is dropped too.
    assert parse_fields("name: anna\nname: bob\nNAME: carl") == {"name": "anna"}


def test_parse_fields_skips_blank_lines_lines_without_colon_and_empty_keys() -> None:
    text = "\n\nhere are the fields\nid: 7\n   \n: orphan value\n  :\nnote:\r\n"
    # Only "id" and "note" have a key; "note" keeps its empty value.
    assert parse_fields(text) == {"id": "7", "note": ""}
    assert parse_fields("") == {}


# ------------------------------------------------------------------------------------------------ field metrics


def test_field_f1_by_hand() -> None:
    metric = FieldF1()
    # Predicted pairs: name (right after normalisation), id (wrong), city (right) -> 3 predicted, TP = 2.
    # Target pairs: name, id, city, type -> 4. P = 2/3, R = 2/4 = 1/2, F1 = 2PR / (P + R) = (2/3) / (7/6) = 4/7.
    metric.update(
        ["Name: Anna  Lee\nid: 123\ncity: osaka"],
        [{"name": "anna lee", "id": "124", "City": "Osaka", "type": "id card"}],
    )
    assert metric.compute().item() == pytest.approx(4 / 7)


def test_field_f1_string_targets_are_parsed() -> None:
    metric = FieldF1()
    # Pred {a: 1, b: 2}, target {a: 1, b: 3, c: 4}: TP = 1, P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 2/5.
    metric.update(["a: 1\nb: 2"], ["a: 1\nb: 3\nc: 4"])
    assert metric.compute().item() == pytest.approx(2 / 5)


def test_field_f1_is_micro_over_the_epoch() -> None:
    preds = ["a: 1\nb: 2", "a: 1", "no fields here", "c: 3\nc: 4", "x: 1\ny: 2\nz: 3"]
    targets = ["a: 1\nb: 3", "a: 1\nb: 2", "a: 1", {"c": "3"}, {"x": "1", "y": "2", "z": "3"}]
    # TP:        1 + 1 + 0 + 1 (first "c" wins) + 3 = 6
    # predicted: 2 + 1 + 0 + 1 + 3 = 7
    # target:    2 + 2 + 1 + 1 + 3 = 9
    # P = 6/7, R = 6/9 = 2/3, F1 = 2 * 6 / (7 + 9) = 3/4.
    # (The mean of per-sample F1s would be (1/2 + 2/3 + 0 + 1 + 1) / 5 = 19/30; micro is not that.)
    one = FieldF1()
    one.update(preds, targets)
    many = FieldF1()
    many.update(preds[:2], targets[:2])
    many.update(preds[2:3], targets[2:3])
    many.update(preds[3:], targets[3:])
    assert one.compute().item() == pytest.approx(3 / 4)
    assert many.compute().item() == pytest.approx(one.compute().item(), abs=0)
    assert (int(one.true_positives), int(one.predicted_pairs), int(one.target_pairs)) == (6, 7, 9)


def test_field_f1_undefined_is_zero() -> None:
    with pytest.warns(UserWarning, match=_NO_UPDATE):
        assert FieldF1().compute().item() == 0.0
    metric = FieldF1()
    metric.update(["nothing"], [{}])  # 0 predicted and 0 target pairs
    assert metric.compute().item() == 0.0
    metric.update(["a: 1"], [{"b": "2"}])  # TP = 0 with pairs on both sides -> F1 = 0
    assert metric.compute().item() == 0.0


def test_field_metrics_check_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        FieldF1().update(["a: 1", "b: 2"], ["a: 1"])
    with pytest.raises(ValueError, match="1 predictions but 2 targets"):
        FieldExactMatch().update(["a: 1"], ["a: 1", "b: 2"])
    with pytest.raises(TypeError, match="single string"):
        FieldF1().update("a: 1", ["a: 1"])  # type: ignore[arg-type]


def test_exact_match_by_hand() -> None:
    metric = FieldExactMatch()
    metric.update(
        ["a: 1\nb: 2", "B: 2\na:  1", "a: 1", "intro line\na: 1\na: 9"],
        ["a: 1\nb: 2", {"a": "1", "b": "2"}, "a: 1\nb: 2", {"a": "1"}],
    )
    # Sample 1: identical. Sample 2: same fields, other order and case -> match. Sample 3: "b" missing -> no.
    # Sample 4: the first "a" wins and the line without ':' is ignored -> match. 3 of 4.
    assert metric.compute().item() == pytest.approx(3 / 4)
    metric.update(["a: 2"], ["a: 1"])  # accumulates: 3 of 5
    assert metric.compute().item() == pytest.approx(3 / 5)
    with pytest.warns(UserWarning, match=_NO_UPDATE):
        assert FieldExactMatch().compute().item() == 0.0


# ------------------------------------------------------------------------------------------------ fact recall


def test_normalize_text() -> None:
    assert normalize_text("  Hello,   World: 3-4! ") == "hello world: 3-4"
    assert normalize_text("Friday, 3:30 p.m.\n(“follow-up”)") == "friday 3:30 pm follow-up"


def test_fact_recall_by_hand() -> None:
    metric = FactRecall()
    metric.update(
        ["A red circle at the top left, and a BLUE square!", "Order: 48213. Appointment: Friday 3 p.m."],
        [["red circle at the top left", "blue square", "green star"], ["order: 48213", "appointment: friday 3 pm"]],
    )
    # First text: 2 of 3 facts (no green star). Second: "order: 48213" and, after dropping the dots,
    # "appointment: friday 3 pm" -> 2 of 2. Micro over facts: (2 + 2) / (3 + 2) = 4/5.
    assert metric.compute().item() == pytest.approx(4 / 5)


def test_fact_recall_matches_whole_words() -> None:
    metric = FactRecall()
    # "order: 4821" is inside "order: 48213" as characters but not as words; "star" is not "start".
    metric.update(["order: 48213, start now"], [["order: 4821", "star", "now"]])
    assert metric.compute().item() == pytest.approx(1 / 3)


def test_fact_recall_accumulates_and_skips_empty_facts() -> None:
    preds = ["a b c", "d e", "f"]
    facts = [["a", "c", "z"], ["...", "e"], []]
    # "..." normalises to "" and is skipped, so the facts are a, c, z, e: found a, c, e -> 3/4.
    one = FactRecall()
    one.update(preds, facts)
    many = FactRecall()
    for pred, sample_facts in zip(preds, facts):
        many.update([pred], [sample_facts])
    assert one.compute().item() == pytest.approx(3 / 4)
    assert many.compute().item() == one.compute().item()
    with pytest.warns(UserWarning, match=_NO_UPDATE):
        assert FactRecall().compute().item() == 0.0
    with pytest.raises(ValueError, match="1 predictions but 2 fact lists"):
        FactRecall().update(["a"], [["a"], ["b"]])
    with pytest.raises(TypeError, match="list of strings"):
        FactRecall().update(["a"], ["a"])


# ------------------------------------------------------------------------------------------------ ROUGE-L


def test_rouge_l_known_pair() -> None:
    metric = RougeL()
    # pred "the cat sat on the mat" (6 words), ref "the cat is on the mat" (6 words):
    # LCS = "the cat on the mat" = 5 -> P = R = 5/6, F = 5/6.
    metric.update(["The cat sat on the mat."], ["the cat is on the mat"])
    assert metric.compute().item() == pytest.approx(5 / 6, abs=1e-4)
    # Second pair: pred "the cat sat" vs ref "the cat sat down": LCS 3, P = 1, R = 3/4, F = 2 * (3/4) / (7/4) = 6/7.
    # The score is the mean over samples: (5/6 + 6/7) / 2 = 71/84.
    metric.update(["the cat sat"], ["the cat sat down"])
    assert metric.compute().item() == pytest.approx(71 / 84, abs=1e-4)
    reference = ROUGEScore(rouge_keys="rougeL")
    reference.update(["The cat sat on the mat.", "the cat sat"], ["the cat is on the mat", "the cat sat down"])
    assert metric.compute().item() == pytest.approx(reference.compute()["rougeL_fmeasure"].item(), abs=0)


# ------------------------------------------------------------------------------------------------ token loss


def _logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    return logits, labels


def test_mean_token_loss_matches_cross_entropy_by_hand() -> None:
    logits, labels = _logits_and_labels()
    metric = MeanTokenLoss()
    metric.update(logits[:1], labels[:1])
    metric.update(logits[1:], labels[1:])
    # Logits at position t predict the label at t + 1. Labelled targets: row 0 positions 2, 3, 4 (labels 3, 4, 1)
    # come from logits 1, 2, 3; row 1 positions 1, 2 (labels 2, 2) come from logits 0, 1. Five terms in all.
    terms = torch.stack(
        [
            F.cross_entropy(logits[0, 1], torch.tensor(3)),
            F.cross_entropy(logits[0, 2], torch.tensor(4)),
            F.cross_entropy(logits[0, 3], torch.tensor(1)),
            F.cross_entropy(logits[1, 0], torch.tensor(2)),
            F.cross_entropy(logits[1, 1], torch.tensor(2)),
        ]
    )
    assert int(metric.tokens) == 5
    assert metric.compute().item() == pytest.approx(terms.mean().item(), rel=1e-6)
    # The same as Hugging Face's shifted loss over the whole batch at once.
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert metric.compute().item() == pytest.approx(shifted.item(), rel=1e-6)


def test_mean_token_loss_edge_cases() -> None:
    with pytest.warns(UserWarning, match=_NO_UPDATE):
        assert math.isnan(MeanTokenLoss().compute().item())
    metric = MeanTokenLoss()
    metric.update(torch.randn(1, 3, 4), torch.full((1, 3), -100))  # nothing labelled: no tokens, no loss
    assert int(metric.tokens) == 0 and metric.loss_sum.item() == 0.0
    with pytest.raises(ValueError, match=r"logits \(1, 3, 4\) and labels \(1, 4\)"):
        metric.update(torch.randn(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_token_perplexity_is_exp_of_mean_loss() -> None:
    logits, labels = _logits_and_labels()
    loss, perplexity = MeanTokenLoss(), TokenPerplexity()
    for metric in (loss, perplexity):
        metric.update(logits[:1], labels[:1])
        metric.update(logits[1:].half(), labels[1:])  # low-precision logits are scored in float32
    assert perplexity.compute().item() == pytest.approx(math.exp(loss.compute().item()), rel=1e-3)


# ------------------------------------------------------------------------------------------------ top-1 agreement


def test_top1_agreement_with_mask() -> None:
    a = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # argmax 1, 0, 1
    b = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [3.0, 1.0]]])  # argmax 1, 1, 0
    unmasked = Top1Agreement()
    unmasked.update(a, b)
    assert unmasked.compute().item() == pytest.approx(1 / 3)  # only position 0 agrees
    masked = Top1Agreement()
    masked.update(a, b, mask=torch.tensor([[True, True, False]]))
    assert masked.compute().item() == pytest.approx(1 / 2)  # positions 0 (agree) and 1 (disagree)
    masked.update(a, b, mask=torch.tensor([[1, 0, 0]]))  # 0/1 masks work too: +1 agreed of +1
    assert (int(masked.agreed), int(masked.total)) == (2, 3)
    assert masked.compute().item() == pytest.approx(2 / 3)


def test_top1_agreement_accumulates_like_one_update() -> None:
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 4, 5, generator=generator), torch.randn(6, 4, 5, generator=generator)
    mask = torch.rand(6, 4, generator=generator) > 0.3
    one, many = Top1Agreement(), Top1Agreement()
    one.update(a, b, mask)
    for i in range(0, 6, 2):
        many.update(a[i : i + 2], b[i : i + 2], mask[i : i + 2])
    expected = ((a.argmax(-1) == b.argmax(-1)) & mask).sum() / mask.sum()
    assert one.compute().item() == pytest.approx(expected.item())
    assert many.compute().item() == one.compute().item()


def test_top1_agreement_shape_errors() -> None:
    metric = Top1Agreement()
    with pytest.raises(ValueError, match=r"logits_a \(1, 3, 2\) and logits_b \(1, 2, 2\)"):
        metric.update(torch.zeros(1, 3, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 3\).*got \(1, 3, 2\)"):
        metric.update(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), mask=torch.ones(1, 3, 2, dtype=torch.bool))
    with pytest.warns(UserWarning, match=_NO_UPDATE):
        assert math.isnan(Top1Agreement().compute().item())


# ------------------------------------------------------------------------------------------------ distributed state


@pytest.mark.parametrize(
    "metric",
    [FieldF1(), FieldExactMatch(), FactRecall(), MeanTokenLoss(), Top1Agreement()],
    ids=lambda metric: type(metric).__name__,
)
def test_states_are_summed_across_ranks(metric: Metric) -> None:
    assert metric._defaults, "no state declared"
    for name in metric._defaults:
        assert metric._reductions[name] is dim_zero_sum, f"{type(metric).__name__}.{name} is not summed"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, port: int, results: dict[int, dict[str, float]]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = TaskMetrics("user_task")
        if rank == 0:  # no fields or facts on this rank
            metrics.update(["the cat sat on the mat"], [{"answer": "the cat is on the mat"}])
        else:
            metrics.update(["a: 1\nb: 2"], [{"answer": "a: 1\nb: 3", "fields": {"a": "1", "b": "3"}}])
        top1 = Top1Agreement()
        top1.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[float(rank), 0.5]]))  # rank 0 agrees, rank 1 not
        results[rank] = {**metrics.compute(), "top1": top1.compute().item()}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_task_metrics_sync_over_two_ranks() -> None:
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(_free_port(), results), nprocs=2, join=True)
    # Only rank 1 saw fields, yet both ranks report field_f1 (TP 1, 2 predicted, 2 target -> 1/2), so every rank
    # logs the same keys. No rank saw facts, so fact_recall is absent everywhere.
    # ROUGE-L is the mean over both samples: rank 0 gives 5/6 (LCS 5 of 6 words each side); rank 1's
    # "a 1 b 2" vs "a 1 b 3" gives LCS 3 of 4 words -> 3/4. Mean (5/6 + 3/4) / 2 = 19/24.
    for rank in (0, 1):
        assert set(results[rank]) == {"rouge_l", "chrf", "field_f1", "top1"}
        assert results[rank]["field_f1"] == pytest.approx(1 / 2)
        assert results[rank]["rouge_l"] == pytest.approx(19 / 24, abs=1e-4)
        assert results[rank]["top1"] == pytest.approx(1 / 2)
    assert results[0]["chrf"] == pytest.approx(results[1]["chrf"])


# ------------------------------------------------------------------------------------------------ TaskMetrics


def test_task_metrics_autofill() -> None:
    metrics = TaskMetrics("autofill")
    assert metrics.names == ("field_f1", "exact_match", "fields", "field_cer") and not metrics.update_called
    metrics.update(
        ["type: id card\nname: anna lee", "type: bank card\nnumber: 1234"],
        [
            {"answer": "type: id card\nname: ann", "fields": {"type": "id card", "name": "ann"}},
            {"answer": "type: bank card\nnumber: 1234", "fields": None},  # falls back to parsing the answer
        ],
    )
    # TP = 1 + 2 = 3, predicted = 2 + 2 = 4, target = 2 + 2 = 4 -> F1 = 2 * 3 / 8 = 3/4. Exact: 1 of 2.
    assert metrics.update_called
    # Per key: type 2 of 2, name 0 of 1 (anna lee vs ann), number 1 of 1; keys no target had are left out.
    # Character errors: "anna lee" vs "ann" is 5 edits over 3 reference characters.
    assert metrics.compute() == pytest.approx({"field_f1": 3 / 4, "exact_match": 1 / 2, "fields/type": 1.0,
                                               "fields/name": 0.0, "fields/number": 1.0, "field_cer/type": 0.0,
                                               "field_cer/name": 5 / 3, "field_cer/number": 0.0})


def test_field_accuracy_by_hand() -> None:
    from framework.metrics import FieldAccuracy

    metric = FieldAccuracy()
    assert metric.keys == ["type", "name", "id", "birth", "city", "number", "expiry", "company", "phone"]
    metric.update(["type: id card\nname: Anna  Lee\nid: 12345678\nbirth: 1990-01-02\ncity: oslo",
                   "type: bank card\nname: bo wu\nnumber: 1234 5678"],
                  [{"type": "id card", "name": "anna lee", "id": "12345679", "birth": "1990-01-02", "city": "rome"},
                   "type: bank card\nname: bo wu\nnumber: 1234 5678\nexpiry: 2030-01\nextra: x"])
    values = metric.compute()
    # type 2/2, name 2/2 (whitespace and case normalised), id 0/1, birth 1/1, city 0/1, number 1/1, expiry 0/1
    # (not predicted); company and phone: no target had them; "extra" is not a reported key.
    expected = {"type": 1.0, "name": 1.0, "id": 0.0, "birth": 1.0, "city": 0.0, "number": 1.0, "expiry": 0.0}
    assert {k: v for k, v in values.items() if v == v} == expected
    assert math.isnan(values["company"]) and math.isnan(values["phone"])
    with pytest.raises(ValueError, match="non-empty and distinct"):
        FieldAccuracy(["a", "A "])


def test_field_char_error_rate_by_hand() -> None:
    from framework.metrics import FieldCharErrorRate

    metric = FieldCharErrorRate()
    assert metric.keys == ["type", "name", "id", "birth", "city", "number", "expiry", "company", "phone"]
    assert metric.compute()["id"] != metric.compute()["id"]  # nothing seen: NaN
    metric.update(["type: id card\nid: 12345670\nbirth: 1990-01-02", "type: bank card\nnumber: 1234 567"],
                  [{"type": "id card", "id": "12345678", "birth": "1990-01-02", "city": "rome"},
                   "type: bank card\nnumber: 1234 5678\nexpiry: 2030-01"])
    # Second batch: the id read right, the city read with one substitution.
    metric.update(["id: 87654321\ncity: roma"], [{"id": "87654321", "city": "rome"}])
    values = metric.compute()
    # id: 1 substitution over 16 characters; city: missing (4 deletions) + 1 substitution over 8; number: 1 of 9;
    # expiry missing: 7 of 7.
    expected = {"type": 0.0, "id": 1 / 16, "birth": 0.0, "city": 5 / 8, "number": 1 / 9, "expiry": 1.0}
    assert {k: v for k, v in values.items() if v == v} == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-empty and distinct"):
        FieldCharErrorRate([])


@pytest.mark.parametrize("task", ["caption", "longcall"])
def test_task_metrics_caption_and_longcall(task: str) -> None:
    metrics = TaskMetrics(task)
    metrics.update(
        ["a red circle on the left", "a blue square"],
        [
            {"answer": "a red circle on the left", "facts": ["red circle on the left"]},
            {"answer": "a green star and a blue square", "facts": ["green star", "blue square"]},
        ],
    )
    values = metrics.compute()
    # Facts: 1 of 1, then 1 of 2 -> 2/3. ROUGE-L: 1 for the identical pair; "a blue square" vs
    # "a green star and a blue square" has LCS 3 -> P = 1, R = 3/7, F = 2 * (3/7) / (10/7) = 3/5. Mean 4/5.
    assert list(values) == ["fact_recall", "rouge_l"]
    assert values["fact_recall"] == pytest.approx(2 / 3)
    assert values["rouge_l"] == pytest.approx(4 / 5, abs=1e-4)
    assert all(isinstance(value, float) for value in values.values())


def test_task_metrics_user_task_reports_optional_metrics_only_when_present() -> None:
    metrics = TaskMetrics("my_data")
    assert metrics.names == ("rouge_l", "chrf")
    # ROUGE-L by hand: LCS of "the cat sat" and "the cat sat down" is 3 words: P = 1, R = 3/4, F = 6/7.
    metrics.update(["the cat sat"], [{"answer": "the cat sat down", "fields": None, "facts": None}])
    values = metrics.compute()
    assert set(values) == {"rouge_l", "chrf"}
    assert values["rouge_l"] == pytest.approx(6 / 7, abs=1e-4)
    chrf = CHRFScore()
    chrf.update(["the cat sat"], [["the cat sat down"]])
    assert values["chrf"] == pytest.approx(chrf.compute().item())

    metrics.reset()
    assert not metrics.update_called
    metrics.update(
        ["name: ada\ncity: rome", "meeting at noon", "plain text"],
        [
            {"answer": "name: ada\ncity: paris", "fields": {"name": "ada", "city": "paris"}},
            {"answer": "meeting at noon on monday", "facts": ["noon", "monday"]},
            {"answer": "plain text"},
        ],
    )
    values = metrics.compute()
    # field_f1 over the one sample with fields: TP 1, 2 predicted, 2 target -> 1/2.
    # fact_recall over the one sample with facts: 1 of 2 -> 1/2.
    assert list(values) == ["rouge_l", "chrf", "field_f1", "fact_recall"]
    assert values["field_f1"] == pytest.approx(1 / 2) and values["fact_recall"] == pytest.approx(1 / 2)


def test_task_metrics_missing_reference_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"sample 1 of the batch has none of the keys \['facts'\]"):
        TaskMetrics("caption").update(["x", "y"], [{"answer": "x", "facts": ["x"]}, {"answer": "y"}])
    with pytest.raises(ValueError, match=r"none of the keys \['fields', 'answer'\]"):
        TaskMetrics("autofill").update(["a: 1"], [{"facts": ["a"]}])
    with pytest.raises(ValueError, match="2 predictions but 1 samples_meta entries"):
        TaskMetrics("caption").update(["x", "y"], [{"answer": "x", "facts": []}])
    with pytest.raises(ValueError, match="non-empty string"):
        TaskMetrics("")


def test_task_metrics_live_in_a_module_dict() -> None:
    holder = nn.ModuleDict({task: TaskMetrics(task) for task in ("autofill", "caption", "jsonl")})
    holder["autofill"].update(["a: 1"], [{"answer": "a: 1"}])
    holder["jsonl"].update(["hello world"], [{"answer": "hello world"}])
    logged = {f"val/{task}/{name}": value for task, m in holder.items() if m.update_called
              for name, value in m.compute().items()}
    assert logged == pytest.approx(
        {"val/autofill/field_f1": 1.0, "val/autofill/exact_match": 1.0, "val/jsonl/rouge_l": 1.0,
         "val/jsonl/chrf": 1.0}
    )
    for metrics in holder.values():
        metrics.reset()
    assert not any(metrics.update_called for metrics in holder.values())
    holder.to(torch.float64)  # moving the holder moves (and keeps) every metric
    assert isinstance(holder["caption"].metrics["fact_recall"], FactRecall)


def test_docstring_examples() -> None:
    import doctest

    import framework.metrics

    assert doctest.testmod(framework.metrics).failed == 0
