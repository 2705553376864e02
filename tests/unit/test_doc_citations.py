"""Citations of our documents point at something that exists (issue #12 item 5).

Comments and docstrings justify defaults with measurements and protocol facts kept in ``docs/``. A citation is written
``docs/<name>.md``, optionally followed on the same line by section numbers (``docs/testbed.md §3``,
``docs/ctera-direct-io.md §2 (metadata), §5 and §11``) or by a heading anchor (``docs/design-notes.md#3-the-pyfuse3-
contract``). This test fails when a cited file does not exist, when a cited section has no heading with that number
in the file (``## 5. ...``, ``### 2.4 ...``), or when an anchor matches no heading. It also fails on the older forms
that cannot be checked: "testbed 3", "design notes 5", "protocol notes", "section 9", ``shared/docs/...``, a document
named without its ``docs/`` folder, or a ``§N`` with no document before it on its line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("directfs", "tests", "benchmarks")
SCANNED_SUFFIXES = frozenset({".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yaml", ".yml", ".json"})
SKIPPED_PARTS = frozenset({"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"})
THIS_FILE = Path(__file__).resolve()
SKIPPED_TREES = frozenset({ROOT / "benchmarks" / "work"})

# A citation: docs/<name>.md, not part of a longer path (so shared/docs/x.md is not one), with an optional #anchor.
CITATION = re.compile(r"(?<![\w./-])docs/(?P<name>[\w.-]+?\.md)(?:#(?P<anchor>[\w-]+))?")
SECTION = re.compile(r"§\s*(?P<number>\d+(?:\.\d+)*)")
# "RFC 9110 §13.1.1" is a section of someone else's document, not of ours.
FOREIGN_SECTION = re.compile(r"\bRFC\s*\d+\s*§\s*\d+(?:\.\d+)*")
# Forms that name no checkable file or section. Checked after the valid citations are cut out of the line.
UNCHECKABLE = (
    (re.compile(r"shared/docs", re.IGNORECASE), "shared/docs/ is outside the repository: cite docs/<name>.md"),
    (re.compile(r"\bprotocol notes\b", re.IGNORECASE), "cite docs/ctera-direct-io.md §N"),
    (re.compile(r"\btestbed\b", re.IGNORECASE), "cite docs/testbed.md §N"),
    (re.compile(r"\bdesign[- ]notes\b", re.IGNORECASE), "cite docs/design-notes.md §N"),
    (re.compile(r"\bsections?\s+\d", re.IGNORECASE), "name the document: docs/<name>.md §N"),
    (re.compile(r"(?<![\w/.-])(?:ctera-direct-io|peers(?:-[\d-]+)?|style-review)\.md\b"), "cite it as docs/<name>.md"),
    (re.compile(r"§"), "a § with no docs/<name>.md before it on the line"),
)
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
HEADING_NUMBER = re.compile(r"^(?P<number>\d+(?:\.\d+)*)\.?(?:\s|$)")
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}: {self.text.strip()}"


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (hyphens and underscores kept), spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@cache
def headings(doc: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(section numbers, anchors) of ``doc``'s headings; lines inside fenced code blocks are not headings."""
    numbers: set[str] = set()
    anchors: set[str] = set()
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        title = match["title"]
        anchors.add(slug(title))
        number = HEADING_NUMBER.match(title)
        if number is not None:
            numbers.add(number["number"])
    return frozenset(numbers), frozenset(anchors)


def check_line(line: str, docs: Path = DOCS) -> list[str]:
    """Why each citation on ``line`` is broken or uncheckable (empty when all are fine)."""
    problems: list[str] = []
    matches = list(CITATION.finditer(line))
    rest = line  # the line with every docs/<name>.md and the sections that follow it blanked out
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        doc = docs / match["name"]
        tail = line[match.end() : end]
        foreign_ends = {m.end() for m in FOREIGN_SECTION.finditer(tail)}
        sections = [(m, m["number"]) for m in SECTION.finditer(tail) if m.end() not in foreign_ends]
        rest = rest[: match.start()] + " " * (match.end() - match.start()) + rest[match.end() :]
        for section, _ in sections:
            start, stop = match.end() + section.start(), match.end() + section.end()
            rest = rest[:start] + " " * (stop - start) + rest[stop:]
        if not doc.is_file():
            problems.append(f"docs/{match['name']} does not exist")
            continue
        numbers, anchors = headings(doc)
        if match["anchor"] is not None and match["anchor"] not in anchors:
            problems.append(f"docs/{match['name']} has no heading with the anchor #{match['anchor']}")
        for _, number in sections:
            if number not in numbers:
                problems.append(f"docs/{match['name']} has no heading numbered {number}")
    rest = FOREIGN_SECTION.sub(lambda m: " " * len(m.group()), rest)
    for pattern, why in UNCHECKABLE:
        if pattern.search(rest):
            problems.append(why)
    return problems


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED_DIRS:
        for folder, dirnames, filenames in os.walk(ROOT / top):
            # Caches and git-ignored scratch (benchmarks/work/: 100k+ generated files) are not the repository's text.
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_PARTS and Path(folder, d) not in SKIPPED_TREES]
            for name in filenames:
                path = Path(folder, name)
                if path.resolve() == THIS_FILE or not path.is_file():
                    continue
                if path.suffix in SCANNED_SUFFIXES or path.name == "Makefile":
                    files.append(path)
    return sorted(files)


def scan() -> list[Problem]:
    problems: list[Problem] = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            whys = check_line(line)
            if whys:
                problems.append(Problem(str(path.relative_to(ROOT)), number, line, "; ".join(whys)))
    return problems


def test_every_citation_names_an_existing_document_and_section() -> None:
    problems = scan()
    assert not problems, "broken or uncheckable document citations:\n" + "\n".join(map(str, problems))


def test_the_cited_documents_exist() -> None:
    for name in ("ctera-direct-io.md", "testbed.md", "design-notes.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_the_scanner_finds_citations() -> None:
    # If the citation pattern stopped matching, the main test would pass vacuously.
    cited = sum(len(CITATION.findall(p.read_text(encoding="utf-8", errors="replace"))) for p in scanned_files())
    assert cited >= 10


@pytest.fixture
def sample_docs(tmp_path: Path) -> Path:
    (tmp_path / "notes.md").write_text(
        "# Notes\n\n## 1. First\n\n### 1.2 Second part\n\n```bash\n# 7. not a heading\n```\n\n## 11. Last\n",
        encoding="utf-8",
    )
    return tmp_path


@pytest.mark.parametrize(
    "line",
    [
        "# see docs/notes.md",
        "# (docs/notes.md §1)",
        "``docs/notes.md`` §1.2 (metadata), §11 (defects)",
        "# docs/notes.md#12-second-part",
        "# docs/notes.md §1 and docs/notes.md §11",
        "# weak validators (RFC 9110 §13.1.1)",
        "# docs/notes.md §1, RFC 9110 §13.1.1 and §11",
        "# the [section] table of the config file",
        "    return sections[0]",
    ],
)
def test_checkable_citations_pass(sample_docs: Path, line: str) -> None:
    assert check_line(line, sample_docs) == []


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("# docs/missing.md §1", "does not exist"),
        ("# docs/notes.md §2", "no heading numbered 2"),
        ("# docs/notes.md §7", "no heading numbered 7"),  # inside a code fence
        ("# docs/notes.md §1.3", "no heading numbered 1.3"),
        ("# docs/notes.md#nowhere", "anchor"),
        ("# (testbed section 5)", "docs/testbed.md"),
        ("# (testbed 3: 16 tasks)", "docs/testbed.md"),
        ("# the testbed's advice", "docs/testbed.md"),
        ("# (design-notes section 1)", "docs/design-notes.md"),
        ("# (design notes 5)", "docs/design-notes.md"),
        ("# (protocol notes 2.1)", "docs/ctera-direct-io.md"),
        ("(section 14 of ``shared/docs/ctera-direct-io.md``)", "shared/docs"),
        ("# (section 4.3)", "name the document"),
        ("# Config per testbed.md section 2.", "docs/testbed.md"),
        ("# the notes in ctera-direct-io.md", "docs/<name>.md"),
        ("# (§5)", "no docs/<name>.md before it"),
    ],
)
def test_broken_or_uncheckable_citations_fail(sample_docs: Path, line: str, why: str) -> None:
    problems = check_line(line, sample_docs)
    assert any(why in problem for problem in problems), problems
