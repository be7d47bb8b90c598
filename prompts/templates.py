"""Prompt templates: one YAML file expands into manifest rows.

    template: "a {animal} in {place}"
    variables: {animal: [cat, dog], place: [a garden, the snow]}
    defaults: {mode: t2v, model: tiny-t2v, num_frames: 17}
    id_prefix: garden

gives the cartesian product in the order the variables are written: garden-0000 "a cat in a
garden", garden-0001 "a cat in the snow", garden-0002 "a dog in a garden", … A variable named
like a manifest column (e.g. `seed: [1, 2]`) also sets that column on each row.
"""

from __future__ import annotations

import csv
import itertools
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tasks.manifest import COLUMNS, SAFE_NAME

TEMPLATE_KEYS = ("template", "variables", "defaults", "id_prefix")
# Columns the template itself fills in.
GENERATED_COLUMNS = ("id", "prompt")


class TemplateError(ValueError):
    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"template {path}: {reason}")


def expand_template(path: str | Path) -> list[dict[str, Any]]:
    """Manifest rows (dicts keyed by column name) for every combination of the variables."""
    spec = _load(path)
    template: str = spec["template"]
    variables: dict[str, list[Any]] = spec["variables"]
    defaults: dict[str, Any] = spec["defaults"]
    prefix: str = spec["id_prefix"]

    names = list(variables)
    combos = list(itertools.product(*(variables[n] for n in names)))
    width = max(4, len(str(len(combos) - 1)))
    rows = []
    for index, values in enumerate(combos):
        chosen = dict(zip(names, values))
        row: dict[str, Any] = {"id": f"{prefix}-{index:0{width}d}",
                               "prompt": template.format_map({k: str(v) for k, v in chosen.items()})}
        row.update(defaults)
        row.update({k: v for k, v in chosen.items() if k in COLUMNS})
        rows.append(row)
    return rows


def write_manifest_csv(rows: Sequence[dict[str, Any]], out_path: str | Path) -> Path:
    """Write rows as a manifest v1 CSV (known columns in reference order, then any others)."""
    present = {c for row in rows for c in row}
    columns = [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return out_path


def _load(path: str | Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(path, f"cannot read it ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict):
        raise TemplateError(path, "must be a mapping with keys " + ", ".join(TEMPLATE_KEYS))
    unknown = sorted(str(k) for k in spec if k not in TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(path, f"unknown key(s): {', '.join(unknown)}; "
                                  f"allowed: {', '.join(TEMPLATE_KEYS)}")

    template = spec.get("template")
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(path, "template must be a non-empty string")
    variables = spec.get("variables") or {}
    if not isinstance(variables, dict):
        raise TemplateError(path, "variables must be a mapping of name → list of values")
    empty = [str(k) for k, v in variables.items() if not isinstance(v, list) or not v]
    if empty:
        raise TemplateError(path, f"variable(s) with no values (need a non-empty list): "
                                  f"{', '.join(empty)}")
    try:
        placeholders = [field for _, field, _, _ in string.Formatter().parse(template)
                        if field is not None]
    except ValueError as exc:
        raise TemplateError(path, f"template is not valid ({exc}); write {{{{ and }}}} for braces") from None
    if any(not p.isidentifier() for p in placeholders):
        bad = sorted({p for p in placeholders if not p.isidentifier()})
        raise TemplateError(path, "placeholders must be plain names like {animal}; got: "
                                  + ", ".join("{" + p + "}" for p in bad))
    unknown = sorted(set(placeholders) - set(variables))
    if unknown:
        raise TemplateError(path, "placeholder(s) with no variable: "
                                  + ", ".join("{" + p + "}" for p in unknown))
    unused = sorted(str(k) for k in variables if k not in placeholders and k not in COLUMNS)
    if unused:
        raise TemplateError(path, f"variable(s) not used in the template and not a manifest "
                                  f"column: {', '.join(unused)}")
    generated = sorted(str(k) for k in variables if k in GENERATED_COLUMNS)
    if generated:
        raise TemplateError(path, f"variable(s) named like a column the template fills in: "
                                  f"{', '.join(generated)}")

    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise TemplateError(path, "defaults must be a mapping of column → value")
    bad_defaults = sorted(str(k) for k in defaults if k not in COLUMNS or k in GENERATED_COLUMNS)
    if bad_defaults:
        raise TemplateError(path, f"defaults for unknown or generated column(s): {', '.join(bad_defaults)}")

    prefix = str(spec.get("id_prefix") or "prompt")
    if not SAFE_NAME.match(prefix) or ".." in prefix or len(prefix) > 100:
        raise TemplateError(path, f"id_prefix {prefix!r} is not safe: letters, digits, '.', '_' and "
                                  f"'-' only, starting with a letter or digit, at most 100 "
                                  f"characters, no '..'")
    return {"template": template, "variables": variables, "defaults": defaults, "id_prefix": prefix}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
