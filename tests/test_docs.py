"""The documents are valid reStructuredText: a broken table or literal hides what it says."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

docutils_core = pytest.importorskip("docutils.core", reason="docutils (a test extra) is missing")

ROOT = Path(__file__).parent.parent
DOCUMENTS = sorted([ROOT / "README.rst", *(ROOT / "docs").glob("*.rst")])


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_document_parses_without_warnings(path: Path) -> None:
    problems = io.StringIO()
    docutils_core.publish_doctree(
        path.read_text(), source_path=str(path),
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": problems})
    assert problems.getvalue() == ""
