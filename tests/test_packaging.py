"""pyproject lists every subpackage, so a wheel (not only an editable install) has them all."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {"stfuse": ROOT / "stfuse", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    found = set()
    for name, path in dirs.items():
        found |= {".".join([name, *p.parent.relative_to(path).parts]) for p in path.rglob("__init__.py")
                  if "__pycache__" not in p.parts}
    assert found == listed, f"unlisted: {sorted(found - listed)}, listed but missing: {sorted(listed - found)}"


def _project_modules() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {"stfuse": ROOT / "stfuse", **{name: ROOT / path for name, path in config["package-dir"].items()}}
    mods = {}
    for pkg, path in dirs.items():
        for f in path.rglob("*.py"):
            parts = [pkg, *f.relative_to(path).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (lazy imports in functions too)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        # a module may read its own package's __init__ names; that is no cycle of jobs
        out |= {t for t in targets if t in mods and t != name and not name.startswith(t + ".")}
    return out


def test_no_import_cycles_among_the_projects_modules():
    """Data flows one way (DESIGN.md): no cycle, counting imports inside functions."""
    import networkx as nx

    mods = _project_modules()
    g = nx.DiGraph([(name, t) for name, path in mods.items() for t in _imports(name, path, mods)])
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"
