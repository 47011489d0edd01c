"""Synthetic on-device tasks, generated deterministically from a seed and an index.

Each task mirrors one use of a phone VLM that the compression studies measure:

- ``caption``: photo-style captions of rendered scenes (photo search and gallery captions). A gradient
  background with 1-3 shapes in distinct named colours on a 3x3 grid; the answer names each shape, its colour
  and its position.
- ``autofill``: field extraction from rendered ID, bank and business cards (form autofill). A card with a type
  header and 3-4 fields in a fixed layout per card type; the answer lists ``"key: value"`` lines.
- ``reading``: text reading (the OCR pretraining of document VLMs): 1-4 lines of random digit groups, dates and
  letter strings on a card-like background, drawn at the card font size up to a few times larger; the answer is
  the text, line by line. Card ids and numbers are random digits that no language prior predicts, so the model
  must read them glyph by glyph; this task gives that skill a denser, easier signal than the cards alone.
- ``longcall``: text-only call transcripts (call summaries under KV-cache compression). Lowercase, ASR-style
  small talk between speakers ``A:`` and ``B:`` with 4-8 facts spread evenly through it; the answer recalls
  the facts in order.

A task is an infinite map-style dataset: ``task[i]`` draws everything from ``random.Random`` seeded with a
stable hash of ``(task name, seed, i)``, so the same arguments always give the same sample (pixel-identical
image), whatever the call order or process. The datamodule chooses how many indices to use.

Example:
    >>> task = make_task("autofill", seed=0, image_size=128)
    >>> sample = task[17]
    >>> sample.image.size, sample.answer.startswith("type: "), sample.source
    ((128, 128), True, 'autofill#17')
"""

from __future__ import annotations

import hashlib
import math
import operator
import random
from functools import lru_cache

from PIL import Image, ImageChops, ImageDraw, ImageFont

from framework.data.sample import Sample

CAPTION_PROMPT = "Describe the photo."
AUTOFILL_PROMPT = "Extract the fields of this card."
LONGCALL_INSTRUCTION = "Summarize the call, listing the facts."
READING_PROMPT = "Read the text."

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
MAX_SEED = 2**63 - 1

# ----------------------------------------------------------------------------------------------------------------
# Shared vocabularies (lowercase: answers and fields are canonical lowercase text).

FIRST_NAMES = (
    "anna", "ben", "carla", "david", "emma", "felix", "grace", "hugo", "iris", "jack",
    "julia", "karl", "laura", "leo", "maria", "marco", "nina", "omar", "paula", "peter",
    "rosa", "sam", "sara", "tom", "vera", "yusuf", "zoe", "alex", "chloe", "dan",
    "elena", "finn", "hana", "ivan", "lena", "mila", "noah", "oscar", "rita", "theo",
)  # fmt: skip
LAST_NAMES = (
    "lee", "smith", "brown", "garcia", "muller", "rossi", "kim", "novak", "silva", "khan",
    "meyer", "dubois", "jensen", "costa", "wong", "patel", "fischer", "lopez", "moreau", "berg",
    "ito", "nguyen", "walker", "young", "klein", "hansen", "romero", "weber", "ali", "park",
    "ward", "reyes", "bauer", "olsen", "price", "lund", "duarte", "sato", "wolf", "haas",
)  # fmt: skip
COMPANIES = (
    "northwind", "acme labs", "bluepeak", "redwood co", "nova tech", "greenleaf", "brightside", "summit inc",
    "silverline", "oakridge", "pixelworks", "harbor ltd", "sunfield", "ironbridge", "cloudnine", "maple corp",
)  # fmt: skip
CITIES = (
    "lyon", "berlin", "madrid", "oslo", "lisbon", "vienna", "dublin", "prague", "milan", "porto",
    "zurich", "krakow", "seville", "tokyo", "osaka", "boston", "denver", "austin", "toronto", "sydney",
    "perth", "cairo", "nairobi", "lima",
)  # fmt: skip
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the tasks.


def _check_int(name: str, value: object, low: int, high: int) -> int:
    """Returns ``value`` if it is an int in ``[low, high]``, else raises a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_float(name: str, value: object, low: float, high: float) -> float:
    """Returns ``value`` as a float if it is a number in ``[low, high]``, else raises a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def sample_rng(name: str, seed: int, index: int) -> random.Random:
    """Returns the generator of one sample, seeded with a stable (unsalted) hash of ``(name, seed, index)``.

    Args:
        name: Task name, so that two tasks with one seed draw different streams.
        seed: Task seed.
        index: Sample index.

    Returns:
        A fresh ``random.Random``; identical arguments give identical streams in every process.
    """
    digest = hashlib.blake2b(f"{name}|{seed}|{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at ``size`` pixels (cached; not stored on tasks, so tasks pickle)."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=16)
def _noise_tile(size: int, sigma: float) -> Image.Image:
    """A fixed ``2*size`` square of grey noise centred on 128 with standard deviation ``sigma``.

    Samples crop it at random offsets. Pillow's own ``effect_noise`` is not seedable, so the tile is drawn once
    from a fixed seed: the mean of two uniform byte images (a triangular, near-Gaussian distribution of standard
    deviation 255 / sqrt(24)), rescaled through a lookup table. All of it runs in C, even at 1024 px.
    """
    rng = random.Random(0x5EED)
    side = 2 * size
    first, second = (Image.frombytes("L", (side, side), rng.randbytes(side * side)) for _ in range(2))
    scale = sigma / (255 / math.sqrt(24))
    table = [min(255, max(0, round(128 + (v - 127.5) * scale))) for v in range(256)]
    grey = ImageChops.add(first, second, scale=2.0).point(table)
    return Image.merge("RGB", (grey, grey, grey))


def _add_noise(image: Image.Image, rng: random.Random, sigma: float) -> Image.Image:
    """Adds sensor-like grey noise of standard deviation ``sigma`` (0 returns ``image`` unchanged)."""
    if sigma <= 0:
        return image
    size = image.width
    ox, oy = rng.randrange(size), rng.randrange(size)
    noise = _noise_tile(size, sigma).crop((ox, oy, ox + size, oy + size))
    return ImageChops.add(image, noise, scale=1.0, offset=-128)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    """Shifts each channel of ``rgb`` by up to ``amount``, clipped to [0, 255]."""
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


class _Advances:
    """Character advances of one font, and which character pairs lay out as the sum of their advances.

    Under Pillow's basic layout (no shaping, so no ligatures) a line's length is its characters' advances plus the
    kerning of each adjacent pair, so a line whose pairs are all unkerned measures exactly the sum of its advances.
    Pairs are checked once each, as lines bring them."""

    def __init__(self, font: ImageFont.FreeTypeFont) -> None:
        self.font = font
        self.basic = font.layout_engine == ImageFont.Layout.BASIC
        self.widths: dict[str, float] = {}
        self.unkerned: dict[str, bool] = {}

    def width(self, char: str) -> float:
        if char not in self.widths:
            self.widths[char] = self.font.getlength(char)
        return self.widths[char]

    def additive(self, text: str) -> bool:
        if not self.basic:
            return False
        for pair in (text[i : i + 2] for i in range(len(text) - 1)):
            if pair not in self.unkerned:
                self.unkerned[pair] = self.font.getlength(pair) == self.width(pair[0]) + self.width(pair[1])
            if not self.unkerned[pair]:
                return False
        return True


@lru_cache(maxsize=64)
def _advances(font: ImageFont.FreeTypeFont) -> _Advances:
    return _Advances(font)


def _text_glyphs(text: str, x: float, y: float, font: ImageFont.FreeTypeFont) -> list[tuple[str, float, float]]:
    """The centres of the non-space characters of ``text`` drawn at ``(x, y)`` with anchor ``"lm"``."""
    advances = _advances(font)
    glyphs = []
    if advances.additive(text):
        # Advances are multiples of 1/64 px, so their running sum is exactly the prefix's measured length; measuring
        # every prefix took a quarter of a card batch's time in the data workers.
        offset = 0.0
        for char in text:
            if not char.isspace():
                glyphs.append((char, x + offset + advances.width(char) / 2, y))
            offset += advances.width(char)
        return glyphs
    for i, char in enumerate(text):
        if not char.isspace():
            glyphs.append((char, x + font.getlength(text[:i]) + font.getlength(char) / 2, y))
    return glyphs


def _vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], side: int) -> Image.Image:
    """A ``side`` x ``side`` RGB image fading from ``top`` to ``bottom``: a 1 x 2 image resized bilinearly.

    Resized as one column, then widened by copying it: the same pixels as resizing the 1 x 2 image to the square
    directly (a one-pixel-wide source takes each value with weight 1), at a fifth of the cost."""
    image = Image.new("RGB", (1, 2))
    image.putpixel((0, 0), top)
    image.putpixel((0, 1), bottom)
    return image.resize((1, side), Image.Resampling.BILINEAR).resize((side, side), Image.Resampling.NEAREST)


class SyntheticTask:
    """Base of the synthetic tasks: an infinite, deterministic, map-style dataset of `Sample`s.

    Subclasses set ``name`` and implement `_generate`. ``len()`` is undefined on purpose; the datamodule picks
    the indices.

    Args:
        seed: Seed of the whole task, in [0, 2**63 - 1]. Two seeds give different samples at every index.
        image_size: Side of the square images in pixels, in [32, 1024].

    Raises:
        ValueError: If an argument is out of range; the message names the argument and the range.
    """

    name: str = ""

    def __init__(self, seed: int = 0, image_size: int = 128) -> None:
        self.seed = _check_int("seed", seed, 0, MAX_SEED)
        self.image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)

    def __getitem__(self, index: int) -> Sample:
        """Returns sample ``index`` (any integer >= 0); the same arguments always give the same sample.

        Raises:
            IndexError: If ``index`` is negative (the task has no end to count from).
        """
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"{self.name} task indices start at 0, got {index}")
        return self._generate(sample_rng(self.name, self.seed, index), f"{self.name}#{index}")

    def _generate(self, rng: random.Random, source: str) -> Sample:
        """Draws one sample from ``rng``; ``source`` goes into `Sample.source`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------------------------------------------
# caption


SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
# Position phrases of the 3x3 grid in reading order. None is a prefix of another, so a fact such as
# "red circle at the top center" never matches inside "red circle at the top left".
POSITIONS = (
    "at the top left", "at the top center", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom center", "at the bottom right",
)  # fmt: skip


def _star(n_points: int, inner: float) -> list[tuple[float, float]]:
    """Unit polygon of a star with ``n_points`` tips (outer radius 1, inner radius ``inner``), tip up."""
    points = []
    for k in range(2 * n_points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / n_points
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


# Unit polygons, scaled by the shape radius. All fit in a square of half-side 1.2, and the thin ones (triangle, star)
# reach further so that every shape covers at least 60% of the area of a circle of radius 1.
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.2), (1.05, 0.65), (-1.05, 0.65)],
    "star": [(1.15 * x, 1.15 * y) for x, y in _star(5, 0.5)],
    "cross": [
        (-0.32, -1.0), (0.32, -1.0), (0.32, -0.32), (1.0, -0.32), (1.0, 0.32), (0.32, 0.32),
        (0.32, 1.0), (-0.32, 1.0), (-0.32, 0.32), (-1.0, 0.32), (-1.0, -0.32), (-0.32, -0.32),
    ],
}  # fmt: skip


class CaptionTask(SyntheticTask):
    """Photo-style captions of rendered scenes.

    The image is a vertical grey gradient with light sensor noise and 1-3 shapes (circle, square, triangle,
    star, cross), each in a different colour from `SHAPE_COLORS` and in a different cell of a 3x3 grid. Shapes
    span 55-95% of a cell, so they stay recognisable at 64 px. Objects are listed in reading order of their
    cells.

    Prompt: ``"Describe the photo."``. Answer, e.g. ``"a red circle at the top left, an orange star in the
    center and a blue square at the bottom right."``. ``facts`` holds one exact substring of the answer per
    object, e.g. ``["red circle at the top left", "orange star in the center", "blue square at the bottom
    right"]``.

    Args:
        seed: Task seed, in [0, 2**63 - 1].
        image_size: Image side in pixels, in [32, 1024].
        min_objects: Fewest shapes per image, in [1, 4].
        max_objects: Most shapes per image, in [min_objects, 4].
        noise: Standard deviation of the grey pixel noise, in [0, 32]; 0 turns it off.

    Raises:
        ValueError: If an argument is out of range.

    Example YAML (datamodule argument)::

        task:
          class_path: framework.data.CaptionTask
          init_args: {seed: 0, image_size: 128, max_objects: 3}
    """

    name = "caption"

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 128,
        min_objects: int = 1,
        max_objects: int = 3,
        noise: float = 4.0,
    ) -> None:
        super().__init__(seed=seed, image_size=image_size)
        self.min_objects = _check_int("min_objects", min_objects, 1, 4)
        self.max_objects = _check_int("max_objects", max_objects, self.min_objects, 4)
        self.noise = _check_float("noise", noise, 0.0, 32.0)

    def _generate(self, rng: random.Random, source: str) -> Sample:
        size = self.image_size
        n = rng.randint(self.min_objects, self.max_objects)
        cells = sorted(rng.sample(range(9), n))
        colors = rng.sample(list(SHAPE_COLORS), n)
        shapes = [rng.choice(SHAPES) for _ in range(n)]

        # Drawn at twice the size and box-downsampled, which anti-aliases the shape edges.
        big = 2 * size
        level = rng.randint(95, 165)  # a grey that no shape colour is mistaken for
        top = _jitter((level, level, level), rng, 8)
        shade = rng.randint(-30, 30)
        bottom = _jitter(tuple(c + shade for c in top), rng, 4)  # type: ignore[arg-type]
        image = _vertical_gradient(top, bottom, big)
        draw = ImageDraw.Draw(image)
        cell = big / 3
        for position, color, shape in zip(cells, colors, shapes):
            row, col = divmod(position, 3)
            radius = cell * rng.uniform(0.28, 0.40)
            slack = max(0.0, cell / 2 - radius * 1.2)
            cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
            cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
            fill = _jitter(SHAPE_COLORS[color], rng, 12)
            if shape == "circle":
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
            else:
                draw.polygon([(cx + x * radius, cy + y * radius) for x, y in _POLYGONS[shape]], fill=fill)
        image = _add_noise(image.reduce(2), rng, self.noise)

        facts = [f"{color} {shape} {POSITIONS[cell_]}" for cell_, color, shape in zip(cells, colors, shapes)]
        phrases = [("an " if fact[0] in "aeiou" else "a ") + fact for fact in facts]
        listing = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return Sample(
            task=self.name,
            prompt=CAPTION_PROMPT,
            answer=listing + ".",
            image=image,
            facts=facts,
            source=source,
            glyphs=[],  # shapes only, no text
        )


# ----------------------------------------------------------------------------------------------------------------
# autofill

# Per card type: the answer keys after "type" (also the order of the rendered lines) and the header colour.
CARD_TYPES: dict[str, tuple[tuple[str, ...], tuple[int, int, int]]] = {
    "id card": (("name", "id", "birth", "city"), (50, 85, 160)),
    "bank card": (("name", "number", "expiry"), (25, 105, 75)),
    "business card": (("name", "company", "phone", "city"), (145, 55, 55)),
}
# Short label printed before a value on the card (none for name, company and city, as on real cards).
_CARD_LABELS = {"id": "ID ", "birth": "BORN ", "expiry": "EXP ", "phone": "TEL "}
_GROUPED = frozenset({"number", "phone"})
_TABLE_COLORS = ((95, 70, 50), (70, 70, 75), (40, 50, 80), (40, 80, 55), (110, 100, 90))


def _digits(rng: random.Random, n: int) -> str:
    """``n`` random decimal digits, the first one non-zero."""
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def _card_value(key: str, rng: random.Random) -> str:
    """Draws the canonical (lowercase) value of one card field."""
    if key == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if key == "id":
        return _digits(rng, 8)
    if key == "birth":
        return f"{rng.randint(1950, 2006)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if key == "city":
        return rng.choice(CITIES)
    if key == "number":
        return f"{_digits(rng, 4)} {_digits(rng, 4)}"
    if key == "expiry":
        return f"{rng.randint(2026, 2035)}-{rng.randint(1, 12):02d}"
    if key == "company":
        return rng.choice(COMPANIES)
    if key == "phone":
        return f"0{rng.randint(1, 9)} {_digits(rng, 4)} {_digits(rng, 4)}"
    raise KeyError(key)


def autofill_font_size(image_size: int) -> int:
    """Font size in pixels of the card text: 11 px at 128 px, proportional to the image side."""
    return max(3, round(image_size * 11 / 128))


class AutofillTask(SyntheticTask):
    """Field extraction from rendered ID, bank and business cards.

    A light card lies on a darker table; a coloured header band carries the card type in capitals ("ID CARD",
    "BANK CARD", "BUSINESS CARD") and the fields follow one per line in a fixed order per card type, in
    uppercase, dark text, Pillow's bundled font at `autofill_font_size` (11 px at 128 px). Some lines carry a
    short label ("ID", "BORN", "EXP", "TEL"); digit groups of card and phone numbers are printed two spaces
    apart so the gap stays visible (the answer keeps one space). The layout scales with the image; text is
    legible from about 96 px. Card type and values are drawn uniformly; the card is shifted by at most
    ``image_size // 64`` px.

    Fields per card type (answer order):

    - id card: name, id (8 digits), birth (YYYY-MM-DD), city
    - bank card: name, number ("4512 8831"), expiry (YYYY-MM)
    - business card: name, company, phone ("06 1234 5678"), city

    Prompt: ``"Extract the fields of this card."``. Answer: ``"type: <card type>"`` then one ``"key: value"``
    per field, lowercase, e.g. ``"type: bank card\\nname: anna lee\\nnumber: 4512 8831\\nexpiry: 2029-03"``.
    ``fields`` is the same mapping, ``type`` included.

    Args:
        seed: Task seed, in [0, 2**63 - 1].
        image_size: Image side in pixels, in [32, 1024] (the vision towers take squares).
        noise: Standard deviation of the grey pixel noise, in [0, 32]; 0 turns it off.

    Raises:
        ValueError: If an argument is out of range.
    """

    name = "autofill"

    def __init__(self, seed: int = 0, image_size: int = 128, noise: float = 4.0) -> None:
        super().__init__(seed=seed, image_size=image_size)
        self.noise = _check_float("noise", noise, 0.0, 32.0)

    def _generate(self, rng: random.Random, source: str) -> Sample:
        card_type = rng.choice(list(CARD_TYPES))
        keys, header_rgb = CARD_TYPES[card_type]
        fields = {"type": card_type}
        fields.update((key, _card_value(key, rng)) for key in keys)

        size = self.image_size
        font = _font(autofill_font_size(size))
        shift = size // 64
        dx, dy = rng.randint(-shift, shift), rng.randint(-shift, shift)
        margin = round(size * 0.04)
        left, top = margin + dx, margin + dy
        right, bottom = size - margin + dx, size - margin + dy
        header_bottom = top + round(size * 0.17)
        pad = round(size * 0.06)
        line_height = round(size * 0.155)

        image = Image.new("RGB", (size, size), _jitter(rng.choice(_TABLE_COLORS), rng, 15))
        draw = ImageDraw.Draw(image)
        card_rgb = _jitter((242, 240, 232), rng, 8)
        draw.rounded_rectangle((left, top, right, bottom), radius=round(size * 0.05), fill=card_rgb)
        header_fill = _jitter(header_rgb, rng, 12)
        draw.rounded_rectangle((left, top, right, header_bottom), radius=round(size * 0.05), fill=header_fill)
        draw.rectangle((left, (top + header_bottom) // 2, right, header_bottom), fill=header_fill)  # square foot
        draw.text(
            (left + pad, (top + header_bottom) / 2), card_type.upper(), fill=(250, 250, 250), font=font, anchor="lm"
        )
        glyphs = _text_glyphs(card_type.upper(), left + pad, (top + header_bottom) / 2, font)
        text_rgb = _jitter((30, 30, 40), rng, 10)
        y = header_bottom + round(size * 0.04) + line_height / 2
        for key in keys:
            # Digit groups get a double space so the gap stays visible in the narrow font.
            line = _CARD_LABELS.get(key, "") + fields[key].upper().replace(" ", "  " if key in _GROUPED else " ")
            draw.text((left + pad, y), line, fill=text_rgb, font=font, anchor="lm")
            glyphs += _text_glyphs(line, left + pad, y, font)
            y += line_height
        image = _add_noise(image, rng, self.noise)

        return Sample(
            task=self.name,
            prompt=AUTOFILL_PROMPT,
            answer="\n".join(f"{key}: {value}" for key, value in fields.items()),
            image=image,
            fields=fields,
            source=source,
            glyphs=glyphs,
        )


# ----------------------------------------------------------------------------------------------------------------
# reading

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reading_line(rng: random.Random) -> tuple[str, str]:
    """One line of random text: ``(answer text, rendered text)``; digit groups are printed two spaces apart."""
    kind = rng.randrange(5)
    if kind == 0:  # a digit run, as an 8-digit id
        text = _digits(rng, rng.randint(4, 10))
        return text, text
    if kind == 1:  # digit groups, as card and phone numbers
        text = " ".join(_digits(rng, rng.randint(2, 4)) for _ in range(rng.randint(2, 3)))
        return text, text.replace(" ", "  ")
    if kind == 2:  # a date
        text = f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        return text, text
    # letter strings: no vocabulary to guess from
    text = " ".join("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(1, 2)))
    return text, text.upper()


class ReadingTask(SyntheticTask):
    """Text reading: random digit groups, dates and letter strings drawn on a card-like background.

    1-4 lines, each one of: a run of 4-10 digits, 2-3 groups of 2-4 digits (printed two spaces apart, like card
    numbers), a date ``YYYY-MM-DD`` (any year 1900-2099), or 1-2 strings of 2-7 random letters (printed in
    capitals). The font is the autofill card font (`autofill_font_size`) scaled by a factor drawn uniformly from
    ``[1, max_font_scale]``, so the model sees card-sized glyphs and larger, easier ones; lines too long for the
    image are drawn again smaller. Nothing in the answer can be guessed, every character has to be read: the
    pretraining objective of OCR-capable VLMs (read all the text), at card scale.

    Prompt: ``"Read the text."``. Answer: the lines, lowercase, joined by newlines.

    Args:
        seed: Task seed, in [0, 2**63 - 1].
        image_size: Image side in pixels, in [32, 1024].
        noise: Standard deviation of the grey pixel noise, in [0, 32]; 0 turns it off.
        max_font_scale: Largest font size as a multiple of the card font, in [1, 4].

    Raises:
        ValueError: If an argument is out of range.
    """

    name = "reading"

    def __init__(self, seed: int = 0, image_size: int = 128, noise: float = 4.0, max_font_scale: float = 2.0) -> None:
        super().__init__(seed=seed, image_size=image_size)
        self.noise = _check_float("noise", noise, 0.0, 32.0)
        self.max_font_scale = _check_float("max_font_scale", max_font_scale, 1.0, 4.0)

    def _generate(self, rng: random.Random, source: str) -> Sample:
        size = self.image_size
        lines = [_reading_line(rng) for _ in range(rng.randint(1, 4))]
        font_size = round(autofill_font_size(size) * rng.uniform(1.0, self.max_font_scale))
        margin, pad = round(size * 0.04), round(size * 0.06)
        width = size - 2 * (margin + pad)
        # Shrink until the longest line and all lines fit (never below the card font).
        while True:
            font, line_height = _font(font_size), round(font_size * 1.4)
            fits = max(font.getlength(shown) for _, shown in lines) <= width and line_height * len(lines) <= width
            if fits or font_size <= autofill_font_size(size):
                break
            font_size -= 1
        shift = size // 64
        left = margin + pad + rng.randint(-shift, shift)
        free = size - 2 * (margin + pad) - line_height * len(lines)
        top = margin + pad + rng.randint(0, max(0, free)) + line_height / 2

        image = Image.new("RGB", (size, size), _jitter(rng.choice(_TABLE_COLORS), rng, 15))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((margin, margin, size - margin, size - margin), radius=round(size * 0.05),
                               fill=_jitter((242, 240, 232), rng, 8))
        text_rgb = _jitter((30, 30, 40), rng, 10)
        glyphs = []
        for i, (_, shown) in enumerate(lines):
            draw.text((left, top + i * line_height), shown, fill=text_rgb, font=font, anchor="lm")
            glyphs += _text_glyphs(shown, left, top + i * line_height, font)
        image = _add_noise(image, rng, self.noise)
        return Sample(
            task=self.name,
            prompt=READING_PROMPT,
            answer="\n".join(text for text, _ in lines),
            image=image,
            source=source,
            glyphs=glyphs,
        )


# ----------------------------------------------------------------------------------------------------------------
# longcall

_INTERJECTIONS = ("well", "oh", "right", "yes", "hmm", "okay", "sure", "honestly", "you know", "ah")
_SUBJECTS = ("i", "we", "my sister", "my neighbour", "the kids", "my brother", "a friend of mine", "my colleague")
_SUBJECTS_3RD = ("my sister", "my neighbour", "my brother", "a friend of mine", "my colleague", "my mother")
# (past tense, base form, objects that make sense with the verb)
_ACTIVITIES = (
    ("cleaned", "clean", ("the kitchen", "the garage", "the car", "the bikes", "the windows")),
    ("painted", "paint", ("the garden fence", "the kitchen", "the garage", "the old chairs")),
    ("watched", "watch", ("an old movie", "a football match", "a cooking show", "the new series")),
    ("fixed", "fix", ("the garden fence", "the bikes", "the car", "the dishwasher", "the old chairs")),
    ("visited", "visit", ("my aunt", "the new museum", "the old harbour", "the flower market")),
    ("tried", "try", ("a new recipe", "the new bakery", "a yoga class", "the swimming pool")),
    ("finished", "finish", ("a jigsaw puzzle", "a long book", "the photo albums", "the new series")),
    ("sorted out", "sort out", ("the photo albums", "the garage", "the balcony plants", "the old clothes")),
)
_WHEN_PAST = (
    "last weekend",
    "yesterday",
    "this morning",
    "over the holidays",
    "after work",
    "the other night",
    "a while ago",
    "earlier today",
)
_WHEN_FUTURE = ("next month", "some time soon", "when it gets warmer", "after the holidays", "later this year")
_WEATHER = ("quite nice", "a bit grey", "really windy", "surprisingly warm", "cold and rainy", "very changeable")
_WEATHER_WHEN = ("all week", "lately", "since the weekend", "around here", "this spring")
_ADJECTIVES = ("lovely", "exhausting", "like a lot of work", "fun", "relaxing", "complicated", "great")
_OPINIONS = (
    "traffic is getting worse",
    "summers are too short",
    "coffee tastes better at home",
    "the bus is never on time",
    "good shoes are worth it",
    "it is hard to find time for hobbies",
)
_TRANSITIONS = (
    "let me just check something",
    "where was i",
    "it is good to hear from you",
    "thanks for bearing with me",
    "sorry, the line is a bit noisy",
)
_FILLER_TEMPLATES = (
    "{subject} {verb_past} {object} {when_past}.",
    "the weather has been {weather} {weather_when}.",
    "{interj}, i know what you mean.",
    "{interj}, that sounds {adjective}.",
    "did you {verb_base} {object} {when_past}?",
    "{subject_3rd} always says that {opinion}.",
    "anyway, {transition}.",
    "we should {verb_base} {object} {when_future}.",
    "{interj}, {subject} {verb_past} {object} too.",
    "i was thinking about {object} {when_past}.",
)
_ACKS_1 = ("okay.", "right.", "sure.", "mhm.", "yes.", "great.")  # one word, a two-word turn with its tag
_ACKS_2 = ("i see.", "got it.", "oh, nice.", "fair enough.", "makes sense.")  # two words
_GREETING = ("hello, thank you for calling, how can i help you today?", "hi, thanks, i hope you can help me.")
_GOODBYE = "thanks, bye."

# Fact key -> sentence templates; "{v}" is the value, which the answer repeats verbatim.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "name": ("my name is {v}.", "this is {v} speaking.", "you can put it under the name {v}."),
    "phone": ("my phone number is {v}.", "you can reach me on {v}."),
    "order": ("the order number is {v}.", "i am calling about order {v}."),
    "amount": ("the total comes to {v}.", "i was charged {v}."),
    "city": ("i live in {v}.", "i am calling from {v}.", "my address is in {v}."),
    "appointment": ("let us book the appointment for {v}.", "so the appointment is on {v}."),
    "account": ("my account number is {v}.", "the account is {v}."),
    "delivery": ("the delivery should arrive on {v}.", "they promised delivery for {v}."),
    "reference": ("the reference code is {v}.", "my ticket reference is {v}."),
}
_FACT_LEADS = ("", "okay, so ", "right, ", "just so you know, ", "oh, and ")
_CONSONANTS = "bcdfghjklmnpqrstvwxz"
# Fillers hold no digits, weekdays or fact words. A fact turn is at most 24 words with its tag (14 for the last
# fact, which gets no trailing small talk), so 40 words per fact leave room for every fact and the goodbye.
_WORDS_PER_FACT = 40


def _fact_value(key: str, rng: random.Random) -> str:
    """Draws the value of one call fact (lowercase, as spoken in the ASR-style transcript)."""
    if key == "name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if key == "phone":
        return f"0{rng.randint(1, 9)} {_digits(rng, 4)} {_digits(rng, 4)}"
    if key == "order":
        return _digits(rng, 5)
    if key == "amount":
        return f"{rng.randint(12, 980)} dollars"
    if key == "city":
        return rng.choice(CITIES)
    if key == "appointment":
        return f"{rng.choice(WEEKDAYS)} {rng.randint(1, 12)} {rng.choice(('am', 'pm'))}"
    if key == "account":
        return _digits(rng, 7)
    if key == "delivery":
        return f"{rng.choice(WEEKDAYS)} {rng.choice(('morning', 'afternoon', 'evening'))}"
    if key == "reference":
        return rng.choice(_CONSONANTS) + rng.choice(_CONSONANTS) + _digits(rng, 4)
    raise KeyError(key)


def _filler_sentence(rng: random.Random) -> str:
    """One small-talk sentence from the template grammar."""
    verb_past, verb_base, objects = rng.choice(_ACTIVITIES)
    return rng.choice(_FILLER_TEMPLATES).format(
        subject=rng.choice(_SUBJECTS),
        subject_3rd=rng.choice(_SUBJECTS_3RD),
        verb_past=verb_past,
        verb_base=verb_base,
        object=rng.choice(objects),
        when_past=rng.choice(_WHEN_PAST),
        when_future=rng.choice(_WHEN_FUTURE),
        weather=rng.choice(_WEATHER),
        weather_when=rng.choice(_WEATHER_WHEN),
        interj=rng.choice(_INTERJECTIONS),
        adjective=rng.choice(_ADJECTIVES),
        opinion=rng.choice(_OPINIONS),
        transition=rng.choice(_TRANSITIONS),
    )


def _fill(rng: random.Random, budget: int) -> list[str]:
    """Small-talk turn bodies whose words, one speaker tag per turn included, sum to exactly ``budget``.

    ``budget`` must be 0 or at least 2 (a turn is a tag plus at least one word).
    """
    turns: list[str] = []
    while budget >= 6:
        body = " ".join(_filler_sentence(rng) for _ in range(rng.randint(1, 3)))
        words = 1 + len(body.split())
        for _ in range(4):  # too long for what is left: try single sentences
            if words <= budget and budget - words != 1:
                break
            body = _filler_sentence(rng)
            words = 1 + len(body.split())
        else:
            break  # finish with short acknowledgements
        turns.append(body)
        budget -= words
    while budget > 0:
        if budget == 3:
            turns.append(rng.choice(_ACKS_2))
            budget -= 3
        else:
            turns.append(rng.choice(_ACKS_1))
            budget -= 2
    return turns


class LongCallTask(SyntheticTask):
    """Text-only call transcripts for summary and recall under KV-cache compression.

    The transcript is lowercase, ASR-style, one turn per line, speakers alternating ``"A: "`` and ``"B: "``. It
    opens with a greeting, continues with small talk from a template grammar (no digits, weekdays or fact
    words) and closes with a goodbye. ``k`` facts (``k`` uniform in [min_facts, max_facts], keys drawn without
    repetition from `FACT_TEMPLATES`: name, phone, order, amount, city, appointment, account, delivery,
    reference) are stated one per turn, fact ``i`` starting near word ``n * (i + 0.5) / k``. The length ``n``
    (words of the transcript, speaker tags included, i.e. ``len(transcript.split())``) is drawn uniformly in
    [min_words, max_words] and met exactly; 700-2800 words is about 1-4K tokens for a small BPE tokenizer.

    Prompt: the transcript, then ``"\\nSummarize the call, listing the facts."``. Answer: one ``"key: value"``
    per fact in order of appearance, e.g. ``"appointment: friday 3 pm\\norder: 48213"``. ``facts`` holds the
    answer lines, ``fields`` the same as a mapping. Values appear verbatim in the transcript.

    Args:
        seed: Task seed, in [0, 2**63 - 1].
        image_size: Accepted for a uniform interface and checked, but unused (``image`` is ``None``).
        min_words: Shortest transcript in words, in [40 * max_facts, 100000].
        max_words: Longest transcript in words, in [min_words, 100000].
        min_facts: Fewest facts per call, in [1, 9].
        max_facts: Most facts per call, in [min_facts, 9].

    Raises:
        ValueError: If an argument is out of range.
    """

    name = "longcall"

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 128,
        min_words: int = 700,
        max_words: int = 2800,
        min_facts: int = 4,
        max_facts: int = 8,
    ) -> None:
        super().__init__(seed=seed, image_size=image_size)
        self.min_facts = _check_int("min_facts", min_facts, 1, len(FACT_TEMPLATES))
        self.max_facts = _check_int("max_facts", max_facts, self.min_facts, len(FACT_TEMPLATES))
        self.min_words = _check_int("min_words", min_words, _WORDS_PER_FACT * self.max_facts, 100_000)
        self.max_words = _check_int("max_words", max_words, self.min_words, 100_000)

    def _generate(self, rng: random.Random, source: str) -> Sample:
        n_words = rng.randint(self.min_words, self.max_words)
        k = rng.randint(self.min_facts, self.max_facts)
        keys = rng.sample(list(FACT_TEMPLATES), k)
        values = [_fact_value(key, rng) for key in keys]

        turns = [_GREETING[0], _GREETING[1]]
        used = sum(1 + len(turn.split()) for turn in turns)
        for i, (key, value) in enumerate(zip(keys, values)):
            gap = round(n_words * (i + 0.5) / k) - used
            gap = 0 if gap <= 0 else max(gap, 2)
            filler = _fill(rng, gap)
            fact_turn = rng.choice(_FACT_LEADS) + rng.choice(FACT_TEMPLATES[key]).format(v=value)
            if i < k - 1 and rng.random() < 0.5:
                fact_turn += " " + _filler_sentence(rng)
            turns += filler + [fact_turn]
            used += gap + 1 + len(fact_turn.split())
        left = n_words - used
        goodbye = 1 + len(_GOODBYE.split())
        if left >= goodbye and left - goodbye != 1:
            turns += _fill(rng, left - goodbye) + [_GOODBYE]
        elif left >= 2:
            turns += _fill(rng, left)
        elif left == 1:
            turns[-1] += " " + rng.choice(_ACKS_1)

        transcript = "\n".join(f"{'AB'[t % 2]}: {body}" for t, body in enumerate(turns))
        facts = [f"{key}: {value}" for key, value in zip(keys, values)]
        return Sample(
            task=self.name,
            prompt=f"{transcript}\n{LONGCALL_INSTRUCTION}",
            answer="\n".join(facts),
            image=None,
            fields=dict(zip(keys, values)),
            facts=facts,
            source=source,
        )


# ----------------------------------------------------------------------------------------------------------------

TASKS: dict[str, type[SyntheticTask]] = {
    CaptionTask.name: CaptionTask,
    AutofillTask.name: AutofillTask,
    LongCallTask.name: LongCallTask,
    ReadingTask.name: ReadingTask,
}


def make_task(name: str, **kwargs: object) -> SyntheticTask:
    """Builds a registered synthetic task by name.

    Args:
        name: A key of `TASKS` (``"caption"``, ``"autofill"``, ``"longcall"``, ``"reading"``, or one a user
            registered).
        **kwargs: Constructor arguments of the task (``seed``, ``image_size``, task-specific ones).

    Returns:
        The task.

    Raises:
        ValueError: If ``name`` is not registered (the message lists the known tasks) or an argument is out
            of range.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
