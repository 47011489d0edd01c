"""Tests of the synthetic tasks: determinism, answer/fields/facts consistency, lengths, argument checks."""

from __future__ import annotations

import doctest
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from framework.data import TASKS, AutofillTask, CaptionTask, LongCallTask, ReadingTask, Sample, make_task, parse_fields
from framework.data import sample as sample_module
from framework.data import tasks as T

REPO = Path(__file__).resolve().parents[1]
N = 40  # samples per property check


def _signature(sample: Sample) -> tuple:
    """Everything a sample holds, with the image as raw bytes, for exact comparisons."""
    image = None if sample.image is None else (sample.image.mode, sample.image.size, sample.image.tobytes())
    return (sample.task, sample.prompt, sample.answer, image, sample.fields, sample.facts, sample.source)


def _small(name: str, **kwargs) -> T.SyntheticTask:
    """A task sized for fast tests."""
    if name == "longcall":
        kwargs = {"min_words": 320, "max_words": 600, **kwargs}
    return make_task(name, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# all tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_order_independent(name):
    first = _small(name, seed=3)
    forward = [_signature(first[i]) for i in range(6)]
    second = _small(name, seed=3)
    backward = [_signature(second[i]) for i in reversed(range(6))][::-1]
    assert forward == backward
    assert _signature(first[2]) == forward[2]  # asking twice gives the same sample


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeds_and_indices_differ(name):
    a, b = _small(name, seed=0), _small(name, seed=1)
    assert all(_signature(a[i]) != _signature(b[i]) for i in range(10))
    assert len({a[i].answer for i in range(10)}) > 5


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_samples_in_another_process(name):
    """The per-sample seed must not depend on Python's salted hash()."""
    code = (
        "from framework.data import make_task;"
        f"t = make_task({name!r}, seed=5, **({{'min_words': 320, 'max_words': 400}} if {name!r} == 'longcall' "
        "else {}));"
        "s = t[11]; import hashlib;"
        "print(hashlib.sha1((s.prompt + s.answer).encode() + (s.image.tobytes() if s.image else b'')).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={"PYTHONHASHSEED": hashseed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hashseed in ("1", "2")
    }
    assert len(digests) == 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_pickles_for_dataloader_workers(name):
    task = _small(name, seed=7)
    clone = pickle.loads(pickle.dumps(task))
    assert _signature(clone[4]) == _signature(task[4])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sample_basics(name):
    task = _small(name)
    for i in range(5):
        sample = task[i]
        assert sample.task == name
        assert sample.source == f"{name}#{i}"
        assert sample.prompt and sample.answer
        assert "<image>" not in sample.prompt
        if name == "longcall":
            assert sample.image is None
        else:
            assert sample.image.mode == "RGB" and sample.image.size == (128, 128)


def test_index_checks():
    task = make_task("caption")
    with pytest.raises(IndexError, match="start at 0"):
        task[-1]
    with pytest.raises(TypeError):
        task[1.5]
    np = pytest.importorskip("numpy")
    assert _signature(task[np.int64(3)]) == _signature(task[3])


def test_unknown_task_name():
    with pytest.raises(ValueError, match=r"'captions'.*autofill, caption, longcall"):
        make_task("captions")


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("caption", {"image_size": 16}, "image_size"),
        ("caption", {"image_size": 2048}, "image_size"),
        ("autofill", {"image_size": 31}, "image_size"),
        ("autofill", {"image_size": 128.0}, "image_size"),
        ("longcall", {"image_size": 8}, "image_size"),
        ("caption", {"seed": -1}, "seed"),
        ("autofill", {"seed": True}, "seed"),
        ("caption", {"min_objects": 0}, "min_objects"),
        ("caption", {"min_objects": 3, "max_objects": 2}, "max_objects"),
        ("caption", {"noise": -1.0}, "noise"),
        ("autofill", {"noise": 100}, "noise"),
        ("longcall", {"min_words": 900, "max_words": 800}, "max_words"),
        ("longcall", {"min_words": 50}, "min_words"),
        ("longcall", {"min_facts": 0}, "min_facts"),
        ("longcall", {"max_facts": 10}, "max_facts"),
        ("longcall", {"min_facts": 5, "max_facts": 4}, "max_facts"),
        ("reading", {"max_font_scale": 0.5}, "max_font_scale"),
        ("reading", {"noise": -2}, "noise"),
    ],
)
def test_bad_arguments(name, kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be .* in \[.*\], got"):
        make_task(name, **kwargs)


def test_registry():
    assert TASKS == {"caption": CaptionTask, "autofill": AutofillTask, "longcall": LongCallTask,
                     "reading": ReadingTask}
    assert isinstance(make_task("caption", seed=1, image_size=64, max_objects=2), CaptionTask)


@pytest.mark.parametrize("module", [T, sample_module])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_parse_fields():
    text = "type: bank card\nname:  anna lee \nnot a field\n: empty key\nname: other\nurl: http://x"
    assert parse_fields(text) == {"type": "bank card", "name": "anna lee", "url": "http://x"}


# ---------------------------------------------------------------------------------------------------------------
# caption

_CAPTION = re.compile(r"^an? (\w+) (\w+) (.+)$")


def test_caption_answer_and_facts():
    task = make_task("caption", seed=1)
    counts = set()
    for i in range(N):
        sample = task[i]
        assert sample.prompt == "Describe the photo."
        assert sample.fields is None
        assert sample.answer.endswith(".") and sample.answer == sample.answer.lower()
        facts = sample.facts
        counts.add(len(facts))
        assert all(fact in sample.answer for fact in facts)
        positions, colors = [], []
        for fact in facts:
            color, shape, position = fact.split(" ", 2)
            assert color in T.SHAPE_COLORS and shape in T.SHAPES and position in T.POSITIONS
            positions.append(T.POSITIONS.index(position))
            colors.append(color)
        assert positions == sorted(set(positions))  # distinct cells, in reading order
        assert len(set(colors)) == len(colors)
        # the answer is exactly the facts with articles, joined as a list
        phrases = re.split(r", | and ", sample.answer[:-1])
        assert [_CAPTION.match(p).group(0).split(" ", 1)[1] for p in phrases] == facts
    assert counts == {1, 2, 3}


def test_position_phrases_are_not_prefixes():
    for a in T.POSITIONS:
        for b in T.POSITIONS:
            assert a == b or not b.startswith(a)


def test_caption_object_count_and_small_images():
    task = make_task("caption", image_size=64, min_objects=4, max_objects=4, noise=0)
    sample = task[0]
    assert len(sample.facts) == 4 and sample.image.size == (64, 64)


def test_caption_shapes_are_drawn_in_their_cells():
    """The pixel at the centre of each named cell is close to the named colour (noise off)."""
    task = make_task("caption", seed=2, noise=0)
    hits = total = 0
    for i in range(N):
        sample = task[i]
        for fact in sample.facts:
            color, _, position = fact.split(" ", 2)
            row, col = divmod(T.POSITIONS.index(position), 3)
            cell = 128 / 3
            box = (int(col * cell), int(row * cell), int((col + 1) * cell), int((row + 1) * cell))
            data = sample.image.crop(box).tobytes()
            pixels = [data[j : j + 3] for j in range(0, len(data), 3)]
            target = T.SHAPE_COLORS[color]
            near = sum(max(abs(p - t) for p, t in zip(px, target)) <= 16 for px in pixels)
            hits += near >= 0.12 * len(pixels)  # the smallest star or triangle covers 15% of its cell
            total += 1
    assert hits == total


# ---------------------------------------------------------------------------------------------------------------
# autofill

_FORMATS = {
    "type": r"id card|bank card|business card",
    "name": r"[a-z]+ [a-z]+",
    "id": r"[1-9]\d{7}",
    "birth": r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)",
    "city": r"[a-z]+",
    "number": r"[1-9]\d{3} [1-9]\d{3}",
    "expiry": r"20\d\d-(0[1-9]|1[0-2])",
    "company": r"[a-z ]+",
    "phone": r"0[1-9] [1-9]\d{3} [1-9]\d{3}",
}


def test_autofill_answer_and_fields():
    task = make_task("autofill", seed=4)
    types = set()
    for i in range(N):
        sample = task[i]
        assert sample.prompt == "Extract the fields of this card."
        assert sample.facts is None
        assert parse_fields(sample.answer) == sample.fields
        assert sample.answer == "\n".join(f"{k}: {v}" for k, v in sample.fields.items())
        card_type = sample.fields["type"]
        types.add(card_type)
        assert list(sample.fields) == ["type", *T.CARD_TYPES[card_type][0]]
        for key, value in sample.fields.items():
            assert re.fullmatch(_FORMATS[key], value), (key, value)
    assert types == set(T.CARD_TYPES)


@pytest.mark.parametrize("size", [64, 96, 128, 224, 384, 512, 1024])
def test_autofill_longest_lines_fit_the_card(size):
    font = T._font(T.autofill_font_size(size))
    width = max(font.getlength(n.upper()) for n in T.FIRST_NAMES) + font.getlength(" ")
    width += max(font.getlength(n.upper()) for n in T.LAST_NAMES)
    lines = ["BUSINESS CARD", "BORN 1999-09-09", "TEL 09  9999  9999", max(T.COMPANIES, key=len).upper()]
    width = max([width] + [font.getlength(line) for line in lines])
    inner = size - 2 * round(size * 0.04) - 2 * round(size * 0.06)
    assert width <= inner
    assert T.autofill_font_size(128) == 11


def test_autofill_renders_text():
    """Text pixels (dark) appear in the field area; the card is light."""
    sample = make_task("autofill", noise=0)[0]
    gray = sample.image.convert("L")
    field_area = gray.crop((10, 35, 118, 110))
    histogram = field_area.histogram()
    assert sum(histogram[:90]) > 100  # dark glyph pixels
    assert sum(histogram[200:]) > 0.6 * sum(histogram)  # mostly light card


# ---------------------------------------------------------------------------------------------------------------
# longcall


def _transcript(sample: Sample) -> str:
    suffix = "\nSummarize the call, listing the facts."
    assert sample.prompt.endswith(suffix)
    return sample.prompt[: -len(suffix)]


@pytest.mark.parametrize(("min_words", "max_words"), [(320, 320), (321, 321), (500, 900), (700, 2800)])
def test_longcall_length_within_bounds(min_words, max_words):
    task = make_task("longcall", seed=9, min_words=min_words, max_words=max_words)
    lengths = [len(_transcript(task[i]).split()) for i in range(15)]
    assert all(min_words <= n <= max_words for n in lengths)
    if min_words < max_words:
        assert len(set(lengths)) > 5


def test_longcall_answer_facts_and_spread():
    task = make_task("longcall", seed=2, min_words=400, max_words=1500)
    counts = set()
    for i in range(N):
        sample = task[i]
        transcript = _transcript(sample)
        lines = transcript.split("\n")
        assert all(line.startswith(("A: ", "B: ")[t % 2]) for t, line in enumerate(lines))
        assert all(line[3:] == line[3:].lower() for line in lines)  # ASR-style lowercase
        assert sample.facts == sample.answer.split("\n")
        assert parse_fields(sample.answer) == sample.fields
        assert list(sample.fields) == [f.split(": ", 1)[0] for f in sample.facts]
        counts.add(len(sample.facts))
        # each value appears in the transcript, in answer order, spread over the whole call
        words = transcript.split()
        positions, start = [], 0
        for value in sample.fields.values():
            at = transcript.index(value, start)
            positions.append(len(transcript[:at].split()))
            start = at + len(value)
        assert positions == sorted(positions)
        assert positions[0] < len(words) / 2 < positions[-1]
        k = len(positions)
        for j, position in enumerate(positions):  # fact j starts near word n * (j + 0.5) / k
            assert abs(position - len(words) * (j + 0.5) / k) <= 14  # value sits inside its turn
    assert counts <= set(range(4, 9)) and len(counts) >= 3


def test_longcall_filler_has_no_fact_values():
    """Digits and weekdays in the transcript come only from the facts."""
    task = make_task("longcall", seed=0, min_words=400, max_words=800)
    for i in range(10):
        sample = task[i]
        text = _transcript(sample)
        for value in sample.fields.values():
            text = text.replace(value, "")
        assert not re.search(r"\d", text)
        assert not any(day in text.split() for day in T.WEEKDAYS)


def test_longcall_fact_count_range():
    task = make_task("longcall", min_words=400, max_words=400, min_facts=9, max_facts=9)
    assert len(task[0].facts) == 9
    task = make_task("longcall", min_words=300, max_words=300, min_facts=1, max_facts=1)
    assert len(task[0].facts) == 1


def test_longcall_image_size_is_checked_but_unused():
    assert make_task("longcall", image_size=32, min_words=320, max_words=320)[0].image is None


# ------------------------------------------------------------------------------------------------ reading


def test_reading_answers_are_random_text_of_the_drawn_kinds():
    task = make_task("reading", seed=2)
    lines = [line for i in range(200) for line in task[i].answer.split("\n")]
    assert all(1 <= len(task[i].answer.split("\n")) <= 4 for i in range(200))
    assert all(task[i].prompt == "Read the text." and task[i].fields is None for i in range(5))
    digit_runs = [line for line in lines if line.isdigit()]
    groups = [line for line in lines if " " in line and line.replace(" ", "").isdigit()]
    dates = [line for line in lines if len(line) == 10 and line[4] == line[7] == "-"]
    letters = [line for line in lines if line.replace(" ", "").isalpha()]
    assert digit_runs and groups and dates and letters
    assert len(digit_runs) + len(groups) + len(dates) + len(letters) == len(lines)
    assert all(4 <= len(line) <= 10 for line in digit_runs)
    assert all(line == line.lower() for line in letters)
    assert len(set(lines)) > 0.9 * len(lines)  # random, not drawn from a vocabulary


def test_reading_font_scale_and_fit():
    """Larger scales draw more text pixels on the card; no line runs into the card's right padding."""
    import numpy as np

    margin, pad = round(128 * 0.04), round(128 * 0.06)

    def card(image):
        return np.asarray(image.convert("L"))[margin + 3 : 128 - margin - 3, margin + 3 : 128 - margin - 3]

    def ink(task):
        return np.mean([(card(task[i].image) < 120).mean() for i in range(40)])

    small = make_task("reading", seed=4, max_font_scale=1.0, noise=0)
    large = make_task("reading", seed=4, max_font_scale=3.0, noise=0)
    assert ink(large) > 1.5 * ink(small) > 0
    for i in range(40):
        right_padding = card(large[i].image)[:, -(pad - 6) :]
        assert (right_padding > 150).all(), f"reading#{i} draws text into the card's right padding"


def _glyphs_by_prefix(text: str, x: float, y: float, font) -> list[tuple[str, float, float]]:
    """Reference: every prefix measured by the font itself."""
    return [(c, x + font.getlength(text[:i]) + font.getlength(c) / 2, y) for i, c in enumerate(text) if not c.isspace()]


def test_glyph_centres_equal_measuring_every_prefix() -> None:
    import random as random_module

    from framework.data.tasks import _font, _text_glyphs

    rng = random_module.Random(0)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz -:/.,éÄ"
    for size in (5, 11, 22, 37):
        font = _font(size)
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            assert _text_glyphs(text, 3.5, 7.0, font) == _glyphs_by_prefix(text, 3.5, 7.0, font)


def test_glyph_centres_of_a_kerned_pair_fall_back_to_measuring() -> None:
    from PIL import ImageFont

    from framework.data.tasks import _text_glyphs

    class KernedFont:  # "AV" is kerned: its pair measures 1 px less than its two advances
        layout_engine = ImageFont.Layout.BASIC

        def getlength(self, text: str) -> float:
            return 6.0 * len(text) - text.count("AV")

    font = KernedFont()
    assert _text_glyphs("WAVE AV", 0.0, 0.0, font) == _glyphs_by_prefix("WAVE AV", 0.0, 0.0, font)
    assert _text_glyphs("WAVE", 0.0, 0.0, font)[3] == ("E", 6.0 * 3 - 1 + 3.0, 0.0)  # after the kerned pair


def test_vertical_gradient_equals_resizing_the_two_pixels() -> None:
    import random as random_module

    from PIL import Image

    from framework.data.tasks import _vertical_gradient

    rng = random_module.Random(1)
    for _ in range(300):
        top, bottom = (tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(2))
        side = rng.choice([64, 128, 256, 512])
        two = Image.new("RGB", (1, 2))
        two.putpixel((0, 0), top)
        two.putpixel((0, 1), bottom)
        expected = two.resize((side, side), Image.Resampling.BILINEAR)
        assert _vertical_gradient(top, bottom, side).tobytes() == expected.tobytes()
