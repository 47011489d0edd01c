"""experiments/plugin_overhead.py: every row's plugin config is accepted and timed beside the run without it."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from conftest import ROOT


def _overhead_module():
    spec = importlib.util.spec_from_file_location("plugin_overhead", ROOT / "experiments" / "plugin_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qat_and_sparsity_rows_time_both_halves(tmp_path: Path) -> None:
    module = _overhead_module()
    assert {"qat_w4a8", "ramp_2of4", "l0_50_improved"} <= set(module.PLUGINS)
    qat = module.PLUGINS["qat_w4a8"]["init_args"]
    assert qat["weights"]["bits"] == 4 and qat["activations"]["bits"] == 8
    assert qat["calibration_batches"] < 5  # calibrated inside the warm-up below
    out = tmp_path / "overhead.json"
    rows = module.main(["--smoke", "--plugins", "qat_w4a8", "ramp_2of4", "--steps", "2", "--warmup", "5",
                        "--batch_size", "4", "--out", str(out)])
    assert [row["plugin"] for row in rows] == ["qat_w4a8", "ramp_2of4"]
    for row in rows:
        assert row["step_ms_with"] > 0 and row["step_ms_without"] > 0
        assert row["overhead"] == row["step_ms_with"] / row["step_ms_without"]
        # Every timed step is kept, so a trend (a recompile, a fallback to eager) can be told from periodic work.
        assert len(row["step_ms_with_each"]) == len(row["step_ms_without_each"]) == 2
        assert row["step_ms_with"] == pytest.approx(statistics.mean(row["step_ms_with_each"]), rel=1e-3)
    assert json.loads(out.read_text())["rows"] == rows


def test_cudagraphs_needs_compile() -> None:
    with pytest.raises(SystemExit):
        _overhead_module().main(["--smoke", "--cudagraphs", "--plugins", "ramp_2of4"])


def test_isolated_rounds_alternate_fresh_processes(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    rows = _overhead_module().main(["--smoke", "--plugins", "ramp_2of4", "--steps", "2", "--warmup", "2",
                                    "--batch_size", "4", "--isolated", "--rounds", "2", "--out", str(out)])
    (row,) = rows
    assert row["isolated"] and len(row["overhead_rounds"]) == len(row["overhead_rounds_median"]) == 2
    assert row["overhead"] == statistics.median(row["overhead_rounds"])
    assert len(row["step_ms_with_each"]) == len(row["step_ms_without_each"]) == 4  # two rounds of two steps
    assert all(t > 0 for t in row["step_ms_with_each"] + row["step_ms_without_each"])
    for i, ratio in enumerate(row["overhead_rounds_median"]):  # each round's median step, with over without
        with_steps, without_steps = (row[f"step_ms_{half}_each"][2 * i:2 * i + 2] for half in ("with", "without"))
        assert ratio == statistics.median(with_steps) / statistics.median(without_steps)
    assert json.loads(out.read_text())["rows"] == rows


def test_rounds_need_isolated_processes() -> None:
    with pytest.raises(SystemExit):
        _overhead_module().main(["--smoke", "--rounds", "3", "--plugins", "ramp_2of4"])
