"""Gather the ``summary.json`` of many runs into one table, the input of every results notebook.

Each row is one run: its label (the summary file's name without ``summary``/``.json``, or its run folder's
name), the step counts, every final metric, and every plugin's summary value as ``<plugin>/<key>``::

    python -m framework.sweep runs/ experiments/results/gpu/summary_*.json --out table.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from framework.io import atomic_write_text


def find_summaries(paths: list[str | Path]) -> list[Path]:
    """Summary files named directly or found under folders (``summary*.json``, recursively).

    Raises:
        FileNotFoundError: a path does not exist, or no summary was found at all.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        found += sorted(path.rglob("summary*.json")) if path.is_dir() else [path]
    if not found:
        raise FileNotFoundError(f"no summary*.json under {', '.join(map(str, paths))}")
    return found


def run_label(path: Path) -> str:
    stem = path.stem.removeprefix("summary").strip("_-")
    return stem or path.parent.name


def summary_row(path: Path) -> dict[str, Any]:
    """One flat row from one summary file.

    Raises:
        ValueError: the file is not a run summary (names the file).
    """
    try:
        summary = json.loads(path.read_text())
        metrics, plugins = summary["metrics"], summary.get("plugins", {})
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a run summary written by vlmc ({err})") from err
    row: dict[str, Any] = {"run": run_label(path), "global_step": summary.get("global_step"),
                           "parameters": summary.get("parameters")}
    row.update(metrics)
    for plugin, values in plugins.items():
        row.update({f"{plugin}/{key}": value for key, value in values.items()})
    return row


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    return [summary_row(p) for p in find_summaries(paths)]


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m framework.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="summary files or folders holding them")
    parser.add_argument("--out", help="CSV file to write (default: print)")
    opts = parser.parse_args(argv)
    rows = collect(opts.paths)
    text = to_csv(rows)
    if opts.out:
        atomic_write_text(Path(opts.out), text)
        print(f"{len(rows)} runs written to {opts.out}")
    else:
        print(text, end="")
    return rows


if __name__ == "__main__":
    main()
