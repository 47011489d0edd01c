"""Crash-safe writing and the one module-selection rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SPECS

from framework.io import AtomicCheckpointIO, atomic_directory, atomic_write_json, load_checkpoint_weights
from framework.models import load_vlm
from framework.selection import ModuleSelection


def test_atomic_checkpoint_survives_a_failed_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def broken_save(obj: object, f: str) -> None:
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    # The previous checkpoint is intact and no temporary file is left behind.
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class Payload:
    """An arbitrary pickled object: loading it would run code, so weights_only loading must refuse it."""


def test_checkpoint_loading_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="evil.ckpt is not a readable checkpoint"):
        load_checkpoint_weights(path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="garbage.ckpt is not a readable checkpoint"):
        load_checkpoint_weights(garbage)
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_atomic_directory_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "export"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash mid-export")
    assert (target / "a.txt").read_text() == "one"
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    atomic_write_json(tmp_path / "s.json", {"x": 1})
    assert (tmp_path / "s.json").read_text().strip() == '{\n  "x": 1\n}'


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_tower_shortcuts_split_the_model(family: str) -> None:
    model = load_vlm(str(FAMILY_SPECS[family])).model
    towers = {name: set(ModuleSelection(include=name).select(model)) for name in
              ("language_model", "vision_tower", "projector")}
    assert all(towers.values())
    assert not towers["language_model"] & towers["vision_tower"]
    assert not towers["projector"] & (towers["language_model"] | towers["vision_tower"])
    every_linear = set(ModuleSelection().select(model))
    lm_head = {n for n in every_linear if n.endswith("lm_head")}
    assert every_linear == towers["language_model"] | towers["vision_tower"] | towers["projector"] | lm_head


def test_selection_by_regex_type_and_exclude() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    chosen = ModuleSelection(include=r"language_model.*\.(q|k)_proj$", exclude=r"layers\.1\.").select(model)
    assert sorted(chosen) == ["model.language_model.layers.0.self_attn.k_proj",
                              "model.language_model.layers.0.self_attn.q_proj"]
    norms = ModuleSelection(include="language_model", types=["LlamaRMSNorm"]).select(model)
    assert norms and all(type(m).__name__ == "LlamaRMSNorm" for m in norms.values())
    with pytest.raises(ValueError, match="targets.types: give at least one module type"):
        ModuleSelection(types=[])
