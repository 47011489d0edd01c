"""The small byte-level BPE tokenizer that tiny models ship with.

Trained in about a second on text from the built-in tasks plus the printable ASCII range, so user prompts still
tokenize (byte-level BPE never produces unknown tokens). Rebuild with ``python -m framework.tokenizer``.

A second variant splits every digit into a token of its own (as LLaMA's and Qwen's tokenizers do), so a number is
written digit by digit instead of in BPE chunks whose boundaries depend on the digits ("2661" -> "2", "66", "1"),
which aligns reading a digit off an image with emitting its token. On the GPU base it did not speed up reading (one
seed each, experiments/results/README.md), so the default stays. Rebuild it with
``python -m framework.tokenizer --split_digits``; a config selects it with ``model.tokenizer``.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

from framework.models import IMAGE_TOKENS, SHIPPED_TOKENIZER, SPECIAL_TOKENS

VOCAB_SIZE = 2048
DIGITS_TOKENIZER = SHIPPED_TOKENIZER.with_name("tokenizer_digits.json")


def training_corpus(samples_per_task: int = 400, seed: int = 12345) -> Iterator[str]:
    """Prompts and answers of the caption, autofill and longcall tasks, plus every printable character.

    A fixed list, not every registered task: the shipped tokenizers stay reproducible when a task is added (the
    reading task's random strings would only add merges of random letters).
    """
    from framework.data.tasks import make_task

    yield string.printable
    for name in ("caption", "autofill", "longcall"):
        kwargs = {"min_words": 320, "max_words": 500} if name == "longcall" else {}
        task = make_task(name, seed=seed, **kwargs)
        for index in range(samples_per_task):
            sample = task[index]
            yield sample.prompt
            yield sample.answer


def train_tokenizer(texts: Iterator[str], vocab_size: int = VOCAB_SIZE, split_digits: bool = False):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` with the project's special tokens.

    Args:
        texts: Training text.
        vocab_size: Vocabulary size, special tokens included.
        split_digits: Give every digit a token of its own (no merges across digits).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        # Isolating digits before the byte-level split keeps BPE from merging them; the space before a number
        # stays its own token.
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tokenizer.pre_tokenizer = byte_level
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


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Rebuild the shipped tokenizer.")
    parser.add_argument("--split_digits", action="store_true",
                        help=f"build the digit-splitting variant ({DIGITS_TOKENIZER.name})")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: the shipped asset)")
    args = parser.parse_args(argv)
    path = args.out or (DIGITS_TOKENIZER if args.split_digits else SHIPPED_TOKENIZER)
    tokenizer = train_tokenizer(training_corpus(), split_digits=args.split_digits)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)
    print(f"wrote {path} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
