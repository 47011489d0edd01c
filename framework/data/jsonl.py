"""User data: a JSONL file of prompt/answer records with optional images (LLaVA-style single turn).

One JSON object per line::

    {"image": "images/0001.png", "prompt": "Extract the fields of this card.", "answer": "type: id card\\n...",
     "fields": {"type": "id card"}, "facts": ["..."]}

- ``prompt`` and ``answer`` (strings) are required.
- ``image`` is optional; missing or ``null`` makes a text-only record. A relative path resolves against
  ``image_root`` if given, else against the folder of the JSONL file.
- ``fields`` (object of strings) and ``facts`` (list of strings) are optional and feed the metrics.
- Other keys (``id``, ...) are ignored. Blank lines are skipped.

Every record is read and checked when the dataset is built, so a bad file fails before training starts, with
``path:LINE`` in the message. Images are opened and verified then, and decoded (converted to RGB) only in
``__getitem__``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from framework.data.sample import Sample

log = logging.getLogger(__name__)

_EXAMPLE = '{"image": "img.png", "prompt": "...", "answer": "..."}'


@dataclass(frozen=True)
class _Record:
    """One checked line of the file; the image is a path, decoded on access."""

    prompt: str
    answer: str
    image: Path | None
    fields: dict[str, str] | None
    facts: list[str] | None
    source: str


class JsonlDataset:
    """Map-style dataset of `Sample`s read from a JSONL file.

    Args:
        path: The JSONL file.
        task: Value of `Sample.task` for every record (names the data in logs and metrics).
        skip_corrupt: If True, a record whose image is missing or cannot be decoded is skipped, listed in
            ``skipped`` and counted in one logged warning, instead of raising. Malformed lines (not JSON,
            missing or mistyped keys) always raise: they mean the file has the wrong format.
        image_root: Folder that relative image paths resolve against; defaults to the JSONL file's folder.

    Attributes:
        skipped: ``"path:LINE: reason"`` for each skipped record (empty unless ``skip_corrupt``).

    Raises:
        FileNotFoundError: If ``path`` is not a file or ``image_root`` is not a folder.
        ValueError: If a line is not a JSON object, lacks ``prompt``/``answer``, has a value of the wrong type,
            names an image that is missing or undecodable (unless ``skip_corrupt``), or if no usable record is
            left. The message starts with ``path:LINE:``.

    Example::

        dataset = JsonlDataset("data/cards.jsonl", task="cards", skip_corrupt=True)
        sample = dataset[0]  # Sample(task="cards", ..., source="data/cards.jsonl:1")
    """

    def __init__(
        self,
        path: str | Path,
        task: str = "jsonl",
        skip_corrupt: bool = False,
        image_root: str | Path | None = None,
    ) -> None:
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty string, got {task!r}")
        self.path = Path(path)
        self.task = task
        self.skip_corrupt = skip_corrupt
        self.image_root = Path(image_root).expanduser() if image_root is not None else self.path.parent
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL file not found: {self.path}")
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image_root is not a folder: {self.image_root}")

        self.skipped: list[str] = []
        self._records: list[_Record] = []
        image_errors: dict[Path, str | None] = {}  # each image is verified once, however many records share it
        with self.path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                where = f"{self.path}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
                if not line.strip():
                    continue
                record = self._parse(line, where)
                if record.image is not None:
                    if record.image not in image_errors:
                        image_errors[record.image] = _verify_image(record.image)
                    problem = image_errors[record.image]
                    if problem is not None:
                        message = f"{where}: {problem}"
                        if not skip_corrupt:
                            raise ValueError(message + " (pass skip_corrupt=True to skip such records)")
                        self.skipped.append(message)
                        continue
                self._records.append(record)

        if self.skipped:
            log.warning(
                "%s: skipped %d of %d records with a missing or corrupt image; first: %s",
                self.path,
                len(self.skipped),
                len(self.skipped) + len(self._records),
                self.skipped[0],
            )
        if not self._records:
            detail = f" ({len(self.skipped)} skipped for bad images)" if self.skipped else ""
            raise ValueError(f"{self.path}: no usable records{detail}; expected lines like {_EXAMPLE}")

    def _parse(self, line: str, where: str) -> _Record:
        """Checks one non-blank line and resolves its image path; raises ValueError naming ``where``."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: not valid JSON ({error.msg} at column {error.colno}); expected one object per line "
                f"like {_EXAMPLE}"
            ) from None
        if not isinstance(obj, dict):
            kind = _json_type(obj)
            raise ValueError(f"{where}: expected a JSON object like {_EXAMPLE}, got {kind}")  # noqa: TRY004
        for key in ("prompt", "answer"):
            if key not in obj:
                raise ValueError(f"{where}: missing required key {key!r} (a string); expected {_EXAMPLE}")
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {_json_type(obj[key])}")  # noqa: TRY004

        image = obj.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: 'image' must be a non-empty path string or null, got {image!r}")
            image_path = Path(image).expanduser()
            image = image_path if image_path.is_absolute() else self.image_root / image_path

        fields = obj.get("fields")
        if fields is not None and not (isinstance(fields, dict) and all(isinstance(v, str) for v in fields.values())):
            raise ValueError(
                f'{where}: \'fields\' must be an object of strings, e.g. {{"name": "anna lee"}}, '
                f"got {json.dumps(fields)[:80]}"
            )
        facts = obj.get("facts")
        if facts is not None and not (isinstance(facts, list) and all(isinstance(f, str) for f in facts)):
            raise ValueError(f"{where}: 'facts' must be a list of strings, got {json.dumps(facts)[:80]}")

        return _Record(obj["prompt"], obj["answer"], image, fields, facts, where)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        """Returns record ``index`` (negative indices count from the end), decoding its image to RGB.

        Raises:
            IndexError: If ``index`` is out of range.
            ValueError: If the image passed verification but fails to decode (e.g. truncated pixel data).
        """
        record = self._records[index]
        image = None
        if record.image is not None:
            try:
                with Image.open(record.image) as file:
                    image = file.convert("RGB")
            except (OSError, ValueError, SyntaxError) as error:
                raise ValueError(f"{record.source}: cannot decode image {record.image}: {error}") from error
        return Sample(
            task=self.task,
            prompt=record.prompt,
            answer=record.answer,
            image=image,
            fields=dict(record.fields) if record.fields is not None else None,
            facts=list(record.facts) if record.facts is not None else None,
            source=record.source,
        )

    def __repr__(self) -> str:
        return f"JsonlDataset(path={str(self.path)!r}, task={self.task!r}, records={len(self)})"


def _verify_image(path: Path) -> str | None:
    """Returns why ``path`` is not a usable image, or None if PIL opens and verifies it."""
    if not path.exists():
        return f"image not found: {path}"
    if not path.is_file():
        return f"image path is not a file: {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad data (OSError, SyntaxError, ...)
        return f"cannot decode image {path}: {type(error).__name__}: {error}"
    return None


def _json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
