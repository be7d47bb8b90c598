"""Every public engine module says what it exports (`__all__`), sorted, and every name exists."""

from __future__ import annotations

import importlib
import pkgutil

import engine


def test_engine_modules_declare_sorted_existing_exports():
    names = sorted(m.name for m in pkgutil.iter_modules(engine.__path__) if not m.name.startswith("_"))
    assert {"family", "registry", "requests", "t2v", "cache", "settings", "errors"} <= set(names)
    for name in names:
        module = importlib.import_module(f"engine.{name}")
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"engine.{name} has no __all__"
        missing = [n for n in exported if not hasattr(module, n)]
        assert not missing, f"engine.{name}.__all__ names what it lacks: {missing}"


def test_engine_imports_no_prefect_and_reads_no_environment():
    """Settings come from the environment once, at the edge (EngineSettings.from_env)."""
    import ast
    import pathlib
    root = pathlib.Path(engine.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.split(".")[0] == "prefect" for m in mods), path.name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
                assert node.attr not in ("environ", "getenv", "putenv"), f"{path.name} reads the environment"
