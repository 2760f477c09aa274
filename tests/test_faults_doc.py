"""docs/faults.md pins every fault to the test that proves it: each test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def test_every_test_named_in_faults_md_exists() -> None:
    doc = (ROOT / "docs" / "faults.md").read_text()
    # `test_x`, `file.py::test_x`, `test_x[case]`, `test_prefix_*`; not file names (`test_tls.py`).
    named = set(re.findall(r"(?:`|::|, )(test_\w+\*?)(?![\w.])", doc))
    assert len(named) > 50  # the page is read, not skipped
    defined = _defined_tests()
    missing = sorted(n for n in named if not (
        n in defined or (n.endswith("*") and any(d.startswith(n[:-1]) for d in defined))))
    assert missing == [], f"docs/faults.md names tests that do not exist: {missing}"
