"""The README and docs/ name only files that exist: every `moe_export/...` path they mention is checked."""

from __future__ import annotations

import re

from tests.conftest import REPO

_PATH = re.compile(r"moe_export/[A-Za-z0-9_/]+\.(?:py|cc|inc|md)")


def test_every_moe_export_path_in_readme_and_docs_exists() -> None:
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = {(doc.name, path) for doc in documents for path in _PATH.findall(doc.read_text())}
    assert named, "the pattern found no path at all: it no longer matches how the docs name files"
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO / path).is_file())
    assert not missing, missing
