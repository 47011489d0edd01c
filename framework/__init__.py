"""vlmc's core: the VLM LightningModule, the plugin contract, data, metrics, export and the CLI.

Heavy imports stay lazy so ``vlmc --help`` answers quickly; import the names from here in configs
(``class_path: framework.VLMModule``).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "VLMModule": "framework.module",
    "CompressionPlugin": "framework.plugin",
    "PluginConflictError": "framework.plugin",
    "ModuleSelection": "framework.selection",
    "VLMDataModule": "framework.data.datamodule",
    "load_vlm": "framework.models",
    "export_model": "framework.export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'framework' has no attribute {name!r}")
