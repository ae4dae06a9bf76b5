"""Result tables and files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def format_table(rows: list[dict[str, object]], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> str:
    """A plain-text table of dict rows (missing cells blank)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))

    def cell(value) -> str:
        if value is None:
            return ""
        return floatfmt.format(value) if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def metrics_table(results: dict[str, float]) -> str:
    """Metrics logged as ``{prefix}/{metric}`` and ``{prefix}/exit_{i}/{metric}``: one row per exit."""
    rows: dict[str, dict[str, object]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if parts[-1] == "loss":
            continue
        exit_name = parts[1].replace("_", " ") if len(parts) == 3 else "final"
        row = rows.setdefault(exit_name, {"exit": exit_name})
        row[f"{parts[0]}/{parts[-1]}"] = float(value)

    def order(name: str) -> float:
        return float(name.split()[1]) if name.startswith("exit ") else float("inf")

    ordered = [rows[k] for k in sorted(rows, key=order)]
    if len(ordered) > 1:  # the final exit is also the last numbered one: show it once
        ordered.pop()
        ordered[-1]["exit"] += " (final)"
    return format_table(ordered)
