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
