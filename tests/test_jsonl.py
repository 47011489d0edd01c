"""Tests of the JSONL + image loader: good files, text-only rows, and every kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from framework.data import JsonlDataset, Sample
from framework.data import jsonl as jsonl_module


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    """Writes ``lines`` (objects are JSON-encoded, strings are written as they are) one per line."""
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder with an RGB PNG, an RGBA PNG, a greyscale JPEG, a garbage .png and a truncated PNG."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (24, 16), (200, 10, 10)).save(folder / "red.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(folder / "blue.png")
    Image.new("L", (10, 10), 90).save(folder / "grey.jpg")
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    data = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return folder


def test_good_file(tmp_path, image_dir):
    path = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"image": "images/red.png", "prompt": "Describe the photo.", "answer": "a red square.", "id": 7},
            "",
            {"image": "images/blue.png", "prompt": "p2", "answer": "a2", "facts": ["blue"]},
            "   ",
            {"prompt": "text only", "answer": "yes", "fields": {"name": "anna lee"}},
            {"image": None, "prompt": "null image", "answer": "ok"},
            {"image": str(image_dir / "grey.jpg"), "prompt": "absolute path", "answer": "grey"},
            {"image": "images/red.png", "prompt": "shared image", "answer": "again"},
        ],
    )
    dataset = JsonlDataset(path)
    assert len(dataset) == 6 and dataset.skipped == []

    first = dataset[0]
    assert isinstance(first, Sample)
    assert (first.task, first.prompt, first.answer, first.source) == (
        "jsonl", "Describe the photo.", "a red square.", f"{path}:1"
    )  # fmt: skip
    assert first.image.mode == "RGB" and first.image.size == (24, 16)
    assert first.image.getpixel((0, 0)) == (200, 10, 10)
    assert first.fields is None and first.facts is None

    second = dataset[1]
    assert second.source == f"{path}:3"  # blank lines keep their numbers
    assert second.image.mode == "RGB" and second.facts == ["blue"]
    text_only = dataset[2]
    assert text_only.image is None and text_only.fields == {"name": "anna lee"}
    assert dataset[3].image is None
    assert dataset[4].image.mode == "RGB" and dataset[4].image.size == (10, 10)
    assert dataset[-1].prompt == "shared image"
    with pytest.raises(IndexError):
        dataset[6]


def test_task_name_and_image_root(tmp_path, image_dir):
    (tmp_path / "sub").mkdir()
    path = _write_jsonl(tmp_path / "sub" / "d.jsonl", [{"image": "red.png", "prompt": "p", "answer": "a"}])
    dataset = JsonlDataset(str(path), task="cards", image_root=image_dir)
    sample = dataset[0]
    assert sample.task == "cards" and sample.image.size == (24, 16)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: image not found: .*sub.*red\.png"):
        JsonlDataset(path)  # without image_root the path resolves next to the JSONL file


def test_returned_samples_are_independent(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a", "facts": ["x"], "fields": {"k": "v"}}])
    dataset = JsonlDataset(path)
    dataset[0].facts.append("y")
    dataset[0].fields["k"] = "changed"
    assert dataset[0].facts == ["x"] and dataset[0].fields == {"k": "v"}


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlDataset(path)


def test_missing_image_root(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(FileNotFoundError, match="image_root.*elsewhere"):
        JsonlDataset(path, image_root=tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "answer": ', r"not valid JSON .*expected one object per line"),
        ("not json", r"not valid JSON"),
        ('["prompt", "answer"]', r"expected a JSON object .*got array"),
        ({"answer": "a"}, r"missing required key 'prompt'"),
        ({"prompt": "p"}, r"missing required key 'answer'"),
        ({"prompt": 3, "answer": "a"}, r"'prompt' must be a string, got number"),
        ({"prompt": "p", "answer": None}, r"'answer' must be a string, got null"),
        ({"prompt": "p", "answer": "a", "image": 5}, r"'image' must be a non-empty path string or null"),
        ({"prompt": "p", "answer": "a", "image": ""}, r"'image' must be a non-empty path string or null"),
        ({"prompt": "p", "answer": "a", "fields": {"n": 1}}, r"'fields' must be an object of strings"),
        ({"prompt": "p", "answer": "a", "fields": ["x"]}, r"'fields' must be an object of strings"),
        ({"prompt": "p", "answer": "a", "facts": "x"}, r"'facts' must be a list of strings"),
        ({"prompt": "p", "answer": "a", "facts": [1]}, r"'facts' must be a list of strings"),
    ],
)
@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_malformed_line_names_file_and_line(tmp_path, line, message, skip_corrupt):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "ok"}, "", line])
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: {message}"):
        JsonlDataset(path, skip_corrupt=skip_corrupt)  # format errors are never skipped


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        JsonlDataset(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "answer": "a"}\n')
    assert JsonlDataset(path)[0].prompt == "café"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("images/missing.png", r"image not found: .*missing\.png"),
        ("images", r"image path is not a file: .*images"),
        ("images/garbage.png", r"cannot decode image .*garbage\.png"),
        ("images/truncated.png", r"cannot decode image .*truncated\.png"),
    ],
)
def test_bad_image_names_file_line_and_image(tmp_path, image_dir, image, message):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"image": "images/red.png", "prompt": "p", "answer": "a"}, {"image": image, "prompt": "p", "answer": "a"}],
    )
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: {message}.*skip_corrupt=True"):
        JsonlDataset(path)


def test_skip_corrupt_counts_and_warns(tmp_path, image_dir, caplog):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "images/red.png", "prompt": "p1", "answer": "a"},
            {"image": "images/missing.png", "prompt": "p2", "answer": "a"},
            {"image": "images/garbage.png", "prompt": "p3", "answer": "a"},
            {"prompt": "p4", "answer": "a"},
            {"image": "images/garbage.png", "prompt": "p5", "answer": "a"},
            {"image": "images/truncated.png", "prompt": "p6", "answer": "a"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="framework.data.jsonl"):
        dataset = JsonlDataset(path, skip_corrupt=True)
    assert [dataset[i].prompt for i in range(len(dataset))] == ["p1", "p4"]
    assert [entry.split(": ", 1)[0] for entry in dataset.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "image not found" in dataset.skipped[0] and "cannot decode image" in dataset.skipped[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4 of 6 records" in warnings[0].getMessage()


def test_clean_file_logs_nothing(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with caplog.at_level(logging.WARNING, logger="framework.data.jsonl"):
        JsonlDataset(path, skip_corrupt=True)
    assert caplog.records == []


def test_each_image_is_verified_once(tmp_path, image_dir, monkeypatch):
    calls = []
    verify = jsonl_module._verify_image
    monkeypatch.setattr(jsonl_module, "_verify_image", lambda p: calls.append(p) or verify(p))
    records = [{"image": "images/red.png", "prompt": str(i), "answer": "a"} for i in range(5)]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    assert len(JsonlDataset(path)) == 5 and len(calls) == 1


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_file(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"d\.jsonl: no usable records"):
        JsonlDataset(path)


def test_all_records_skipped(tmp_path, image_dir):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "images/missing.png", "prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match=r"no usable records \(1 skipped for bad images\)"):
        JsonlDataset(path, skip_corrupt=True)


def test_image_decoded_lazily(tmp_path, image_dir):
    """The image is decoded in __getitem__; a file that breaks after construction fails there, with its line."""
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "images/red.png", "prompt": "p", "answer": "a"}])
    dataset = JsonlDataset(path)
    (image_dir / "red.png").write_bytes(b"broken later")
    with pytest.raises(ValueError, match=rf"{path}:1: cannot decode image .*red\.png"):
        dataset[0]


def test_bad_task_name(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match="task must be a non-empty string"):
        JsonlDataset(path, task="")
