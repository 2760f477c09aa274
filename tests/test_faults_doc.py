"""docs/faults.md pins every fault to the test that proves it: each test it names must exist, in the file it
names; and every path under tests/ that the docs or the README cite must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_DEF = re.compile(r"^(?:async )?def (test_\w+)", re.M)


def _defined_tests() -> dict[str, set[str]]:
    """Test module basename -> its tests (basenames are unique across tests/: the docs cite them)."""
    modules: dict[str, set[str]] = {}
    for path in (ROOT / "tests").rglob("*.py"):
        assert path.name not in modules or not path.name.startswith("test_"), f"two {path.name} in tests/"
        modules.setdefault(path.name, set()).update(TEST_DEF.findall(path.read_text()))
    return modules


def _matches(name: str, defined: set[str]) -> bool:
    return name in defined or (name.endswith("*") and any(d.startswith(name[:-1]) for d in defined))


def test_every_test_named_in_faults_md_exists() -> None:
    doc = (ROOT / "docs" / "faults.md").read_text()
    modules = _defined_tests()
    defined = set().union(*modules.values())
    # `test_x`, `file.py::test_x`, `test_x[case]`, `test_prefix_*`; not file names (`test_tls.py`).
    named = set(re.findall(r"(?:`|::|, )(test_\w+\*?)(?![\w.])", doc))
    assert len(named) > 50  # the page is read, not skipped
    missing = sorted(n for n in named if not _matches(n, defined))
    assert missing == [], f"docs/faults.md names tests that do not exist: {missing}"
    # `file.py::test_x`: the test is in that file (moved tests take their citations along).
    pinned = re.findall(r"`(test_\w+\.py)::(test_\w+\*?)", doc)
    assert len(pinned) > 20
    misplaced = sorted(f"{f}::{n}" for f, n in pinned if not _matches(n, modules.get(f, set())))
    assert misplaced == [], f"docs/faults.md names tests that are not in the file it names: {misplaced}"


def test_every_tests_path_the_docs_cite_exists() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "data" / "README.md"]
    cited = {(doc.name, p) for doc in docs for p in re.findall(r"\btests/[\w/]+\.\w+", doc.read_text())}
    assert cited  # the docs do cite test paths
    missing = sorted(f"{doc}: {p}" for doc, p in cited if not (ROOT / p).exists())
    assert missing == [], f"docs cite test paths that do not exist: {missing}"
