"""Model specs of pruned shapes, for the same-shape-from-scratch baseline.

``python -m plugins.l0_pruning.spec --base experiments/models/llava-base-gpu.json --fraction 0.5 \\
--out experiments/models/llava-base-gpu-l0-50.json`` writes a tiny-model spec whose text tower has the shape that
``L0Pruning(target_fraction=0.5)`` prunes the base to, so a model of that shape can be trained from scratch.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from plugins.l0_pruning.gates import KINDS


def pruned_spec(spec_json: str | Path | dict[str, Any], keep_shape: dict[str, int]) -> dict[str, Any]:
    """A copy of a tiny spec (path or dict) whose ``hf_config.text_config`` has ``keep_shape`` (HF config keys).

    Qwen2-VL specs also get the merger's output width (``vision_config.hidden_size``) set to the new hidden size.
    """
    spec = copy.deepcopy(spec_json) if isinstance(spec_json, dict) else json.loads(Path(spec_json).read_text())
    text = spec["hf_config"].setdefault("text_config", {})
    text.update({k: int(v) for k, v in keep_shape.items()})
    if spec["hf_config"].get("model_type", "").startswith("qwen2") and "hidden_size" in keep_shape:
        spec["hf_config"].setdefault("vision_config", {})["hidden_size"] = int(keep_shape["hidden_size"])
    return spec


def shape_for_spec(spec_path: str | Path, fraction: float, kinds: tuple[str, ...] = KINDS,
                   multiple_of: int = 1) -> dict[str, int]:
    """The shape :class:`plugins.l0_pruning.L0Pruning` with ``target_fraction=fraction`` prunes a spec's model to."""
    from framework.models import load_vlm
    from plugins.l0_pruning.shape import read_facts, read_shape, shape_dict, shape_for_fraction
    from plugins.l0_pruning.surgery import find_text_tower

    model = load_vlm(str(spec_path)).model
    text = next(m for m in model.modules() if hasattr(m, "embed_tokens") and hasattr(m, "layers"))
    prefix = next(n for n, m in model.named_modules() if m is text)
    layers = {f"{prefix}.layers.{i}": layer for i, layer in enumerate(text.layers)}
    text, stack = find_text_tower(model, layers)
    full, facts = read_shape(model.config), read_facts(model, text, stack[0])
    return shape_dict(shape_for_fraction(full, facts, kinds, fraction, multiple_of))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plugins.l0_pruning.spec", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="tiny model spec JSON of the dense model")
    parser.add_argument("--fraction", type=float, required=True, help="target_fraction, in (0, 1)")
    parser.add_argument("--out", required=True, help="where to write the pruned spec JSON")
    parser.add_argument("--multiple_of", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"unit kinds pruned (default {','.join(KINDS)})")
    opts = parser.parse_args(argv)
    if not 0 < opts.fraction < 1:
        parser.error(f"--fraction: must be in (0, 1), got {opts.fraction}")
    kinds = tuple(k for k in opts.kinds.split(",") if k)
    shape = shape_for_spec(opts.base, opts.fraction, kinds, opts.multiple_of)
    spec = pruned_spec(opts.base, shape)
    # The switches of the unit kinds left whole, as L0Pruning takes them (prune_layers=False, ...).
    kept = "".join(f", prune_{kind}=False" for kind in KINDS if kind not in kinds)
    spec["description"] = (f"{Path(opts.base).name} with its text tower in the shape L0Pruning(target_fraction="
                           f"{opts.fraction}{kept}) prunes it to: {shape}; for the same-shape-from-scratch baseline.")
    Path(opts.out).write_text(json.dumps(spec, indent=2) + "\n")
    print(f"wrote {opts.out}: {shape}")


if __name__ == "__main__":
    main()
