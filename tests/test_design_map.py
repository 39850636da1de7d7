"""docs/DESIGN.md's module map follows the tree (ADR 0128): every module under tally/ has a row, and every
path or dotted name the design, the README and the package READMEs give exists, so the map cannot go stale
unnoticed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"
DOCS = [DESIGN, ROOT / "README.md"]
PACKAGE_READMES = [ROOT / "tally" / "README.md", *sorted((ROOT / "tally").glob("*/README.md"))]

PATH = re.compile(r"(?<![\w./-])tally/[\w./-]*")
# `tally.x.y` naming a module or its attribute; topic names (`tally.events.v1`) and headers are not modules.
DOTTED = re.compile(r"(?<![\w./-])tally(?:\.\w+)+")
OWN_FILE = re.compile(r"`(\w+\.py)`")


def module_map() -> str:
    """The table under "Where each concern lives" whose first column names modules."""
    section = DESIGN.read_text().split("\n## Where each concern lives\n", 1)[1].split("\n## ", 1)[0]
    rows = section.split("\n| module | owns |\n", 1)[1]
    return "\n".join(line.split("|")[1] for line in rows.splitlines() if line.startswith("|"))


def test_every_module_has_a_row_in_the_module_map() -> None:
    mapped = module_map()
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tally").rglob("*.py")
                     if path.name != "__init__.py")
    missing = [module for module in modules if f"`{module}`" not in mapped]
    assert not missing, "\n".join(f"add a row for {module} to docs/DESIGN.md's module map (or name it in a row "
                                  "that owns the same concern)" for module in missing)


def test_every_path_the_docs_name_exists() -> None:
    named = {(doc, path.rstrip(".")) for doc in DOCS + PACKAGE_READMES for path in PATH.findall(doc.read_text())}
    named |= {(readme, str((readme.parent / name).relative_to(ROOT)))
              for readme in PACKAGE_READMES for name in OWN_FILE.findall(readme.read_text())}
    gone = sorted((str(doc.relative_to(ROOT)), path) for doc, path in named if not (ROOT / path).exists())
    assert not gone, "\n".join(f"{doc} names {path}, which does not exist: correct or remove it" for doc, path in gone)


def test_every_dotted_name_the_docs_give_resolves() -> None:
    top = {path.stem for path in (ROOT / "tally").iterdir() if path.suffix == ".py" or path.is_dir()}
    named = {(doc, name) for doc in DOCS + PACKAGE_READMES for name in DOTTED.findall(doc.read_text())
             if name.split(".")[1] in top and not re.search(r"\.v\d+$", name)}
    gone = sorted((str(doc.relative_to(ROOT)), name) for doc, name in named if not _resolves(name))
    assert not gone, "\n".join(f"{doc} names {name}, which is neither a module nor in one: correct or remove it"
                               for doc, name in gone)


def _resolves(name: str) -> bool:
    """The longest importable prefix is a module and the rest are attributes of it."""
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False
