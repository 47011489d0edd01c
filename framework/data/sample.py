"""The one record type that every data source yields, and the parser for "key: value" answers.

Synthetic tasks (`framework.data.tasks`) and user data (`framework.data.jsonl`) both produce `Sample`s; the
collator turns them into model inputs and the metrics compare generated text against `answer`, `fields` and
`facts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class Sample:
    """One prompt/answer pair, with an optional image and the structured truth behind the answer.

    Attributes:
        task: Task name: ``"caption"``, ``"autofill"``, ``"longcall"`` or a user task name (e.g. ``"jsonl"``).
        prompt: Instruction text shown to the model. It holds no image placeholder token; the collator adds
            whatever the model's processor needs.
        answer: Target text.
        image: An RGB image, or ``None`` for text-only tasks.
        fields: For key/value tasks (autofill, longcall): key -> value, exactly the ``"key: value"`` lines of
            ``answer`` (see `parse_fields`).
        facts: For caption and longcall: short phrases that a good answer must contain. Each one is an exact
            substring of ``answer``.
        source: Provenance for error messages, e.g. ``"autofill#17"`` or ``"data/train.jsonl:12"``.
        glyphs: For rendered images: every printed character as ``(character, x, y)``, its centre in image pixels
            (the character as printed, e.g. uppercase); ``[]`` for an image known to hold no text, ``None`` when
            unknown (user images). Per-patch reading targets are built from it (`framework.processing`).
    """

    task: str
    prompt: str
    answer: str
    image: Image.Image | None
    fields: dict[str, str] | None = None
    facts: list[str] | None = None
    source: str = ""
    glyphs: list[tuple[str, float, float]] | None = None


def parse_fields(text: str) -> dict[str, str]:
    """Parses ``"key: value"`` lines, the answer format of the autofill and longcall tasks.

    Each line is split at its first ``":"``; key and value are stripped of surrounding whitespace. Lines with no
    ``":"`` or an empty key are ignored, and the first occurrence of a repeated key wins, so the parser can be
    pointed at free-form model output.

    Args:
        text: Answer text, one ``"key: value"`` per line.

    Returns:
        The key -> value mapping, in line order.

    Example:
        >>> parse_fields("type: bank card\\nname: anna lee")
        {'type': 'bank card', 'name': 'anna lee'}
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields
