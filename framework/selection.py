"""One rule for choosing modules, shared by every plugin.

A selection is a regex over qualified module names plus a tuple of module types, so every plugin can be
pointed at the language model, the vision tower or the projector with the same words::

    targets:
      include: "language_model\\..*(q_proj|k_proj|v_proj|o_proj)$"
      exclude: "lm_head"
      types: [Linear]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

# Named shortcuts for the three towers of a VLM. Real HF families name them differently, so each shortcut is
# an alternation over the names used by LLaVA, Qwen-VL and Idefics3 / SmolVLM.
TOWER_PATTERNS = {
    "language_model": r"(^|\.)(language_model|text_model)(\.|$)",
    "vision_tower": r"(^|\.)(vision_tower|visual|vision_model)(\.|$)(?!.*merger)",
    "projector": r"(^|\.)(multi_modal_projector|connector|merger)(\.|$)",
}

_TYPE_NAMES = {"Linear": nn.Linear, "Embedding": nn.Embedding, "Conv2d": nn.Conv2d, "LayerNorm": nn.LayerNorm}


@dataclass
class ModuleSelection:
    """Which modules a plugin acts on.

    Args:
        include: regex searched in each qualified module name, or one of the tower shortcuts
            ``language_model``, ``vision_tower``, ``projector``. Default: every module.
        exclude: regex; modules whose name matches are dropped (``lm_head`` and embeddings are common).
        types: class names the module must be an instance of (``Linear``, ``Embedding``, ``Conv2d``,
            ``LayerNorm``, or any class name found in the module's MRO).
    """

    include: str = ".*"
    exclude: str | None = None
    types: list[str] = field(default_factory=lambda: ["Linear"])

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            try:
                re.compile(TOWER_PATTERNS.get(pattern, pattern))
            except re.error as err:
                raise ValueError(f"targets.{key}: {pattern!r} is not a valid regular expression ({err})") from err
        if not self.types:
            raise ValueError("targets.types: give at least one module type, e.g. [Linear]")

    def matches(self, name: str, module: nn.Module) -> bool:
        include = TOWER_PATTERNS.get(self.include, self.include)
        if not re.search(include, name):
            return False
        if self.exclude is not None and re.search(TOWER_PATTERNS.get(self.exclude, self.exclude), name):
            return False
        return _is_instance_by_name(module, self.types)

    def select(self, model: nn.Module, *, owner: str = "targets") -> dict[str, nn.Module]:
        """Return ``{qualified name: module}`` for every match; raise if nothing matches.

        Raises:
            ValueError: no module matched, naming the key and showing a few candidate names.
        """
        chosen = {name: module for name, module in model.named_modules() if name and self.matches(name, module)}
        if not chosen:
            typed = [n for n, m in model.named_modules() if n and _is_instance_by_name(m, self.types)]
            examples = ", ".join(typed[:5]) or "none"
            raise ValueError(
                f"{owner}: include={self.include!r} exclude={self.exclude!r} types={self.types} matched no module; "
                f"modules of those types include: {examples}"
            )
        return chosen


def _is_instance_by_name(module: nn.Module, type_names: list[str]) -> bool:
    for type_name in type_names:
        cls = _TYPE_NAMES.get(type_name)
        if cls is not None and isinstance(module, cls):
            return True
        if any(base.__name__ == type_name for base in type(module).__mro__):
            return True
    return False
