"""Collecting run summaries into one table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from framework.sweep import collect, main


def _summary(path: Path, f1: float, plugins: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": 10, "eval_step": 10, "parameters": 123,
                                "metrics": {"val/autofill/field_f1": f1}, "plugins": plugins or {}}))
    return path


def test_rows_carry_metrics_plugin_values_and_labels(tmp_path: Path) -> None:
    _summary(tmp_path / "a" / "summary_dense.json", 0.5)
    _summary(tmp_path / "runs" / "x1" / "summary.json", 0.25, {"sparsity": {"sparsity": 0.75, "pattern": "2:4"}})
    rows = collect([tmp_path / "a", tmp_path / "runs"])
    assert [r["run"] for r in rows] == ["dense", "x1"]
    assert rows[1]["sparsity/sparsity"] == 0.75 and rows[1]["val/autofill/field_f1"] == 0.25
    out = tmp_path / "table.csv"
    main([str(tmp_path / "a"), str(tmp_path / "runs"), "--out", str(out)])
    table = list(csv.DictReader(out.open()))
    assert table[0]["sparsity/pattern"] == "" and table[1]["sparsity/pattern"] == "2:4"


def test_missing_paths_and_foreign_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect([tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="no summary"):
        collect([tmp_path])
    bad = tmp_path / "summary_bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="summary_bad.json: not a run summary"):
        collect([bad])
