"""User values on their way out: to a terminal, a log, a metrics cell, an artifact.

A manifest cell can hold anything: a newline that forges an extra "invalid row" line, an ANSI
escape that rewrites the terminal, ten thousand characters, a formula a spreadsheet would run.
Every value a person reads goes through `shown()` (control characters escaped, length capped);
every metrics.csv cell through `csv_cell()` (OWASP's advice for CSV injection).
"""

from __future__ import annotations

__all__ = ["MAX_SHOWN", "csv_cell", "shown"]

MAX_SHOWN = 200
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as one safe line: C0/C1 control characters and DEL escaped, capped at `limit`."""
    text = str(value)
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    line = "".join(out)
    if len(line) > limit:
        line = f"{line[:limit - 1]}… ({len(text)} characters)"
    return line


def csv_cell(value: object) -> object:
    """A metrics.csv cell a spreadsheet shows as text, never runs: `=1+1` becomes `'=1+1`."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
