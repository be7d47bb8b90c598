"""Shared output of the bench/ scripts: a printed table, a row in docs/BENCHMARKS.md, a JSON file."""

from __future__ import annotations

import datetime as dt
import json
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def card_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {_cpu_count()} cores)"


def _cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def print_table(rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_results(name: str, payload: dict[str, object], markdown_rows: list[str],
                  out_dir: Path | None = None) -> Path:
    """Write docs/benchmarks/<name>.json and append a dated section to docs/BENCHMARKS.md.

    out_dir (e.g. $OUT on the GPU machine) gets copies, so results survive a read-only tree.
    """
    payload = {"date": dt.date.today().isoformat(), "card": card_name(), "command": command_line(),
               **payload}
    docs = ROOT / "docs"
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    json_path = docs / "benchmarks" / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    section = [f"\n## {name} — {payload['date']} — {payload['card']}\n",
               f"`{payload['command']}`\n", *markdown_rows, ""]
    md = docs / "BENCHMARKS.md"
    if not md.exists():
        md.write_text("# Benchmarks\n\nEach section: date, card, command, our numbers and the peer "
                      "measured beside them in the same run. Machine-readable copies live in "
                      "`docs/benchmarks/*.json`.\n")
    with md.open("a") as f:
        f.write("\n".join(section))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json_path.read_text())
        (out_dir / f"{name}.md").write_text("\n".join(section))
    return json_path
