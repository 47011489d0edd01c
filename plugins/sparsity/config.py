"""The words a sparsity config is made of: the pattern (``unstructured`` or ``N:M``), scope, score and schedule.

Both callbacks of this package check their arguments with these helpers, so a misspelt value fails the same
way whichever plugin names it: a ``ValueError`` naming the YAML key and the allowed values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from framework.selection import ModuleSelection

SCHEDULES = ("cubic", "linear")
SCORES = ("magnitude", "activation")
SCOPES = ("layer", "row", "global")
UNSTRUCTURED = "unstructured"


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: anywhere (``n = m = 0``) or at most ``n`` nonzeros in every ``m`` consecutive inputs."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``None`` for unstructured)."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else UNSTRUCTURED


def parse_pattern(text: str, key: str) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` with integers ``0 < N < M``.

    Raises:
        ValueError: naming ``key`` for any other value.
    """
    text = str(text).strip()
    if text == UNSTRUCTURED:
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None:
        raise ValueError(f"{key}: must be 'unstructured' or 'N:M' such as '2:4' or '4:8', got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"{key}: N:M needs positive integers with N < M (e.g. '2:4'), got {text!r}")
    return Pattern(n, m)


def check_choice(value: str, allowed: tuple[str, ...], key: str) -> str:
    """Return ``value`` if it is one of ``allowed``.

    Raises:
        ValueError: naming ``key`` and the allowed values.
    """
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def check_scope(scope: str, pattern: Pattern, key: str) -> str:
    """Return ``scope`` if it is one of :data:`SCOPES` and fits ``pattern``.

    Raises:
        ValueError: naming ``key``: an unknown scope, or ``row`` with an N:M pattern (which ranks within its groups).
    """
    check_choice(scope, SCOPES, key)
    if scope == "row" and pattern.is_nm:
        raise ValueError(f"{key}: 'row' ranks within each output row; an N:M pattern already ranks within its groups "
                         "of M, so use 'layer' or 'global' with it")
    return scope


def resolve_sparsity(value: float | None, pattern: Pattern, key: str, default: float = 0.5) -> float:
    """The target sparsity: ``value`` for unstructured (``default`` when unset), ``1 - N/M`` for N:M.

    Raises:
        ValueError: ``value`` outside [0, 1), or an N:M pattern with a ``value`` other than ``1 - N/M``.
    """
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{key}: must be in [0, 1), got {value!r}")
    if pattern.is_nm:
        implied = pattern.sparsity
        if value is not None and abs(value - implied) > 1e-9:
            raise ValueError(
                f"{key}: pattern {pattern} implies sparsity {implied:g}; leave {key} unset or set it to {implied:g}"
            )
        return implied
    return float(default if value is None else value)


def default_targets() -> ModuleSelection:
    """Every Linear layer of the language model except the LM head."""
    return ModuleSelection(include="language_model", exclude="lm_head")
