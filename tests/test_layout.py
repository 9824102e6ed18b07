"""The README's layout table is true: every module it names exists, and every module is named."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout"):]


def test_every_path_in_the_layout_table_exists():
    named = set(re.findall(r"`((?:cmboost|benchmarks|recipes|scripts|tests|docs)/[^`]*)`", _table()))
    assert named, "no paths in the layout table"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_every_module_is_in_the_layout_table():
    named = set(re.findall(r"`(cmboost/[^`]*\.py)`", _table()))
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "cmboost").rglob("*.py")
               if "cli" not in p.parts and p.name != "__init__.py"}
    assert not sorted(modules - named), sorted(modules - named)
