"""README.md and docs/ cite only what exists, in this repository.

- every `raftlb/...py` file and `raftlb/.../` folder they name exists;
- every dotted name `raftlb.x.y` (also `raftlb.x.y:name`) is a module, or a name in one (a class, function,
  constant, or an attribute of a class: `raftlb.core.leader_table.LeaderTable.apply`), or a logger raftlb
  uses (`raftlb.access`); file names such as `raftlb.yaml` are not citations;
- every relative link (`[x](path#anchor)`) and every `../` path resolves to a file inside the repository,
  and a link's anchor names a heading of that file;
- nothing cites a file that lives outside the repository (DESIGN.md, STYLE.md, ANCHORS.md), in the docs or
  in the code.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUTSIDE = ("DESIGN.md", "STYLE.md", "ANCHORS.md")  # files of the environment, not of the project

PATH = re.compile(r"(?<![\w./-])(raftlb/(?:[A-Za-z_]\w*/)*(?:[A-Za-z_]\w*\.py|))(?![\w/])")
DOTTED = re.compile(r"(?<![\w./-])(raftlb(?:\.[A-Za-z_]\w*)+)(?::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?")
# `raftlb.yaml`, `raftlb.json`, `raftlb.yaml.tmpl`: file names, not Python names.
FILE_SUFFIXES = frozenset({"yaml", "yml", "json", "toml", "tmpl", "md", "txt", "log", "conf", "cfg"})
# A path, then names of it in parentheses: `raftlb/core/router.py` (`Router.classify`).
PATH_WITH_NAMES = re.compile(r"`(raftlb/[\w/]+\.py)` \(((?:`[\w.]+`(?:, | and | or )?)+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
UP_PATH = re.compile(r"(?:\.\./)+[\w./-]*")


def _cited(pattern: re.Pattern[str]) -> list[tuple[str, re.Match[str]]]:
    return [(doc.name, m) for doc in DOCS for m in pattern.finditer(doc.read_text())]


@cache
def _tree(module_file: Path) -> ast.Module:
    return ast.parse(module_file.read_text(), str(module_file))


def _module_file(parts: list[str]) -> Path | None:
    """raftlb/a/b.py or raftlb/a/b/__init__.py for ["raftlb", "a", "b"], if it exists."""
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _names(body: list[ast.stmt]) -> dict[str, ast.stmt]:
    """Names bound at this level of a module or class body (defs, classes, assignments, imports)."""
    out: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            out.update(_names(node.body))
    return out


def _class_names(cls: ast.ClassDef) -> set[str]:
    """A class's attributes: its body's names, `__slots__` entries and `self.x` assigned in its methods."""
    names = set(_names(cls.body))
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    slots = _names(cls.body).get("__slots__")
    if isinstance(slots, ast.Assign):
        names.update(c.value for c in ast.walk(slots.value)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return names


@cache
def _loggers() -> frozenset[str]:
    found: set[str] = set()
    for path in (ROOT / "raftlb").rglob("*.py"):
        found.update(re.findall(r"getLogger\(\s*[\"'](raftlb[\w.]*)[\"']", path.read_text()))
    return frozenset(found)


def resolve(dotted: str, attr: str | None = None) -> str | None:
    """Why `dotted` (with `:attr`) names nothing in raftlb, or None when it does."""
    parts = dotted.split(".")
    if attr is None and parts[-1] in FILE_SUFFIXES:
        return None  # a file name: raftlb.yaml
    if attr is None and dotted in _loggers():
        return None
    # The longest prefix that is a module; the rest are names inside it.
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut])
        if module is not None:
            break
    else:
        return f"no module {dotted}"
    rest = parts[cut:] + (attr.split(".") if attr else [])
    if not rest:
        return None
    names = _names(_tree(module).body)
    node = names.get(rest[0])
    if node is None:
        return f"{'.'.join(parts[:cut])} has no {rest[0]}"
    if len(rest) == 1:
        return None
    if not isinstance(node, ast.ClassDef):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return None  # a re-exported module or name: its attributes are not followed
        return f"{'.'.join(parts[:cut])}.{rest[0]} is not a class: cannot have {'.'.join(rest[1:])}"
    if rest[1] not in _class_names(node) or len(rest) > 2:
        return f"{'.'.join(parts[:cut])}.{rest[0]} has no {'.'.join(rest[1:])}"
    return None


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m[1])
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problem(doc: Path, target: str) -> str | None:
    """Why a link of `doc` to `target` does not reach a file of the repository (or its anchor), or None."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#") and not target[1:]:
        return None  # https:, mailto:
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    if not file.is_relative_to(ROOT):
        return f"{target} is outside the repository"
    if not file.exists():
        return f"{target} does not exist"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{target}: {file.name} has no heading with anchor #{anchor}"
    return None


# -- the tests -----------------------------------------------------------------------------------------------


def test_every_cited_raftlb_path_exists() -> None:
    cited = {(doc, m[1]) for doc, m in _cited(PATH)}
    assert any(p.endswith(".py") for _, p in cited)  # the docs do cite code
    missing = sorted(f"{doc}: {p}" for doc, p in cited if not (ROOT / p).exists())
    assert missing == [], f"docs cite raftlb paths that do not exist: {missing}"


def test_every_cited_raftlb_name_exists() -> None:
    cited = {(doc, m[1], m[2]) for doc, m in _cited(DOTTED)}
    assert len(cited) > 5
    problems = sorted(f"{doc}: {why}" for doc, name, attr in cited if (why := resolve(name, attr)))
    assert problems == [], f"docs cite raftlb names that do not exist: {problems}"


def test_names_cited_beside_a_path_exist_in_that_module() -> None:
    """`raftlb/core/leader_table.py` (`LeaderTable.apply`, `NodeView.is_live`): each name is in that file."""
    cited = {(doc, m[1], name) for doc, m in _cited(PATH_WITH_NAMES)
             for name in re.findall(r"`([\w.]+)`", m[2])}
    assert len(cited) > 10
    problems = sorted(f"{doc}: {path} ({name}): {why}" for doc, path, name in cited
                      if (why := resolve(path.removesuffix(".py").replace("/", "."), name)))
    assert problems == [], f"docs cite names that are not in the module they name: {problems}"


def test_every_relative_link_and_parent_path_stays_in_the_repository() -> None:
    problems: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        targets = set(LINK.findall(text)) | set(UP_PATH.findall(text))
        problems += [f"{doc.name}: {why}" for t in sorted(targets) if (why := link_problem(doc, t))]
    assert problems == [], "\n".join(problems)


def test_nothing_cites_a_file_outside_the_repository() -> None:
    # Every file of the project a reader meets: docs, code, tests, benchmarks, configs, deploy, build files.
    trees = ("raftlb", "tests", "bench", "configs", "deploy", ".ci")
    sources = [*DOCS, *(p for t in trees for p in (ROOT / t).rglob("*")
                        if p.is_file() and p.suffix in ("", ".py", ".yaml", ".yml", ".md", ".tmpl", ".toml")
                        and p != Path(__file__).resolve()),
               *(ROOT / n for n in ("pyproject.toml", "Makefile", "Dockerfile"))]
    found = [f"{p.relative_to(ROOT)}: {name}" for p in sources for name in OUTSIDE if name in p.read_text()]
    assert found == [], f"citations of files that are not in the repository: {found}"


# -- the checker itself catches what it is meant to ----------------------------------------------------------


@pytest.mark.parametrize(("name", "attr", "ok"), [
    ("raftlb.core.leader_table", None, True),
    ("raftlb.core.leader_table.LeaderTable", None, True),
    ("raftlb.core.leader_table.LeaderTable.apply", None, True),
    ("raftlb.core.leader_table", "LeaderTable", True),
    ("raftlb.core", None, True),  # a package
    ("raftlb.access", None, True),  # a logger
    ("raftlb.yaml", None, True),  # a file name
    ("raftlb.core.leader_tabel", None, False),
    ("raftlb.core.leader_table.LeaderTabel", None, False),
    ("raftlb.core.leader_table.LeaderTable.aply", None, False),
    ("raftlb.core.leader_table", "nothing_here", False),
    ("raftlb.core.leader_table", "LeaderTable.misdirect", False),  # only a string in that class
    ("raftlb.nowhere", None, False),
])
def test_resolve_tells_real_names_from_wrong_ones(name: str, attr: str | None, ok: bool) -> None:
    assert (resolve(name, attr) is None) is ok, resolve(name, attr)


def test_link_check_catches_missing_files_anchors_and_escapes() -> None:
    doc = ROOT / "docs" / "protocol.md"
    assert link_problem(doc, "how-it-works.md#how-it-decides") is None
    assert link_problem(doc, "../configs/example.yaml") is None  # in the repository: fine
    assert link_problem(doc, "nowhere.md") is not None
    assert link_problem(doc, "how-it-works.md#no-such-heading") is not None
    assert link_problem(doc, "../../shared/DESIGN.md") is not None
    assert PATH.findall("see `raftlb/proxy/requests.py` and raftlb/core/") == ["raftlb/proxy/requests.py",
                                                                             "raftlb/core/"]


def test_the_signing_test_vector_of_protocol_md_verifies() -> None:
    """docs/protocol.md §6: the canonical form of the §2 example, and its HMAC-SHA256 under the key."""
    doc = (ROOT / "docs" / "protocol.md").read_text()
    block = re.search(r"```json\n(.*?)```", doc, re.S)
    assert block is not None
    example = json.loads(block[1])
    canonical = re.search(r"serializes to\n\n```text\n(.*?)\n```", doc, re.S)
    key = re.search(r"with the key `([^`]+)`", doc)
    sig = re.search(r"its `sig` is `([0-9a-f]{64})`", doc)
    assert example and canonical and key and sig
    assert json.dumps(example, sort_keys=True, separators=(",", ":")) == canonical[1]
    assert hmac.new(key[1].encode(), canonical[1].encode(), hashlib.sha256).hexdigest() == sig[1]
