"""The shipped tokenizers: deterministic rebuild, digit splitting, lossless round trip on every task."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from framework.data.tasks import make_task
from framework.models import SHIPPED_TOKENIZER, SPECIAL_TOKENS, load_vlm
from framework.tokenizer import DIGITS_TOKENIZER, main

ASSETS = {"default": SHIPPED_TOKENIZER, "digits": DIGITS_TOKENIZER}


@pytest.mark.parametrize("variant", sorted(ASSETS))
def test_rebuild_reproduces_the_shipped_asset(variant: str, tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    main(["--out", str(out)] + (["--split_digits"] if variant == "digits" else []))
    assert out.read_bytes() == ASSETS[variant].read_bytes()


def test_digits_get_one_token_each() -> None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(DIGITS_TOKENIZER), **SPECIAL_TOKENS)
    assert tokenizer.tokenize("phone: 04 2661 3341") == [
        "phone", ":", "Ġ", "0", "4", "Ġ", "2", "6", "6", "1", "Ġ", "3", "3", "4", "1"
    ]
    # The default tokenizer merges digits into chunks whose boundaries depend on the digits.
    default = PreTrainedTokenizerFast(tokenizer_file=str(SHIPPED_TOKENIZER), **SPECIAL_TOKENS)
    assert any(len(piece.lstrip("Ġ")) > 1 and piece.lstrip("Ġ").isdigit() for piece in default.tokenize("04 2661 3341"))


@pytest.mark.parametrize("variant", sorted(ASSETS))
@pytest.mark.parametrize("task", ["autofill", "caption", "longcall", "reading"])
def test_answers_round_trip(variant: str, task: str) -> None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS[variant]), **SPECIAL_TOKENS)
    kwargs = {"min_words": 320, "max_words": 400} if task == "longcall" else {"image_size": 64}
    samples = make_task(task, seed=3, **kwargs)
    for index in range(50):
        answer = samples[index].answer
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False).input_ids) == answer


def test_model_builds_with_the_digits_tokenizer() -> None:
    loaded = load_vlm("experiments/models/llava-test.json", tokenizer=str(DIGITS_TOKENIZER))
    assert loaded.tokenizer.tokenize("2661") == ["2", "6", "6", "1"]
    assert loaded.model.get_input_embeddings().num_embeddings >= len(loaded.tokenizer)
