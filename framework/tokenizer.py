"""The small byte-level BPE tokenizer that tiny models ship with.

Trained in about a second on text from the built-in tasks plus the printable ASCII range, so user prompts still
tokenize (byte-level BPE never produces unknown tokens). Rebuild with ``python -m framework.tokenizer``.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

from framework.models import IMAGE_TOKENS, SHIPPED_TOKENIZER, SPECIAL_TOKENS

VOCAB_SIZE = 2048


def training_corpus(samples_per_task: int = 400, seed: int = 12345) -> Iterator[str]:
    """Prompts and answers of the built-in tasks, plus every printable character."""
    from framework.data.tasks import TASKS, make_task

    yield string.printable
    for name in TASKS:
        kwargs = {"min_words": 320, "max_words": 500} if name == "longcall" else {}
        task = make_task(name, seed=seed, **kwargs)
        for index in range(samples_per_task):
            sample = task[index]
            yield sample.prompt
            yield sample.answer


def train_tokenizer(texts: Iterator[str], vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the project's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + IMAGE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main(path: Path = SHIPPED_TOKENIZER) -> None:
    tokenizer = train_tokenizer(training_corpus())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)
    print(f"wrote {path} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
