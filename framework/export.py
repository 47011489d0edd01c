"""Export: the trained model as an HF folder (safetensors) plus whatever the plugins deploy beside it.

The export is built in a temporary folder and renamed into place, so a crash never leaves half an export.
``AutoModelForImageTextToText.from_pretrained(folder)`` loads it back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from framework.io import atomic_directory, atomic_write_json
from framework.plugin import CompressionPlugin


def export_model(
    model: nn.Module,
    tokenizer: Any,
    image_processor: Any,
    directory: str | Path,
    plugins: list[CompressionPlugin] = (),  # type: ignore[assignment]
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (after each plugin's :meth:`prepare_export` on a copy) to ``directory``.

    Returns:
        The export folder, holding ``config.json``, ``model.safetensors``, tokenizer and image processor files,
        each plugin's artifacts and ``vlmc_export.json`` (what was written and by which plugin).
    """
    deployed = copy.deepcopy(model).cpu()
    for plugin in plugins:
        plugin.prepare_export(deployed)
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        deployed.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        manifest: dict[str, Any] = {"plugins": {}, **(extra or {})}
        for plugin in plugins:
            manifest["plugins"][plugin.name] = {
                "class": f"{type(plugin).__module__}.{type(plugin).__qualname__}",
                "files": plugin.export_artifacts(deployed, tmp),
                "summary": plugin.summary(model),
            }
        atomic_write_json(tmp / "vlmc_export.json", manifest)
    return directory
