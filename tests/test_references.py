"""Every document the project cites is in the repository (issue 27): a newcomer who clones it
can read what a docstring, a doc, a role or a script says it follows.  A reference to a
``*.md`` file, a relative Markdown link, a ``reference/…`` path or anything under the
steering area's ``shared/`` must resolve to a file of the checkout, relative to the file
that cites it or to the repository root; a ``DESIGN.md §N`` must name a section of it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.harness import REPO

# A path ending in .md, not inside a URL or an absolute path.
_MD = re.compile(r"(?<![\w./:-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w/-])")
# A relative Markdown link target: [text](target) without a scheme.
_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:)([^)\s#]+)(?:#[^)]*)?\)")
# Paths that only exist outside the repository: the steering area and its notes.
# The steering area's notes were also cited by name ("facts file §1").
_OUTSIDE = re.compile(r"(?:\.\./)+shared/[\w./-]*|/work/shared[\w./-]*|\bshared/reference[\w./-]*"
                      r"|(?i:\bfacts file\b)")
_REFERENCE = re.compile(r"(?<![\w./-])reference/[\w./-]*")
# `REPO / "docs" / "x.md"` in Python is the path docs/x.md.
_JOIN = re.compile(r"""["']\s*/\s*["']""")
_SECTION_CITED = re.compile(r"\bDESIGN(?:\.md)? §(\d+)((?:(?:,| and| to) §\d+)*)")
_SECTION_HEADING = re.compile(r"(?m)^## (\d+)\. ")
# This file writes dangling references on purpose, as examples.
SELF = "tests/test_references.py"


def repository_files(root: Path) -> list[str]:
    """The checkout's files, tracked or new, never what .gitignore hides."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=root, check=True,
                            capture_output=True).stdout.decode()
    return sorted(name for name in set(listed.split("\0")) if name and (root / name).is_file())


def dangling(root: Path, names: list[str]) -> list[str]:
    """``file:line: reference`` for each reference of ``names`` (paths relative to
    ``root``) that no file or directory of ``root`` answers, sorted, each once."""
    sections = set()
    if (root / "DESIGN.md").is_file():
        sections = set(_SECTION_HEADING.findall((root / "DESIGN.md").read_text()))
    found = []
    for name in names:
        if name == SELF:
            continue
        try:
            text = (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        here = (root / name).parent
        for number, line in enumerate(_JOIN.sub("/", text).splitlines(), 1):
            refs = _MD.findall(line)
            if name.endswith(".md"):
                refs += _LINK.findall(line)
            missing = [r for r in refs
                       if not ((here / r).exists() or (root / r).exists())]
            missing += [r for r in _REFERENCE.findall(line)
                        if not ((here / r).exists() or (root / r).exists())]
            missing += _OUTSIDE.findall(line)
            for first, more in _SECTION_CITED.findall(line):
                missing += [f"DESIGN.md §{n}" for n in [first, *re.findall(r"\d+", more)]
                            if n not in sections]
            found += [f"{name}:{number}: {ref}" for ref in missing]
    return sorted(set(found))


def test_every_cited_document_is_in_the_repository():
    missing = dangling(REPO, repository_files(REPO))
    assert not missing, "references to no file of the repository:\n" + "\n".join(missing)


def test_a_reference_to_a_missing_document_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "DESIGN.md").write_text("# c\n\n## 1. One\n\n## 2. Two\n")
    (tmp_path / "docs" / "here.md").write_text("x\n")
    (tmp_path / "docs" / "a.md").write_text(
        "[ok](here.md), [ok](../DESIGN.md#1-one), docs/here.md, DESIGN.md §1 and §2,\n"
        "https://example.org/elsewhere.md, /etc/some.md\n")
    (tmp_path / "m.py").write_text('"""See DESIGN.md §2."""\nP = ROOT / "docs" / "here.md"\n')
    assert dangling(tmp_path, ["docs/a.md", "m.py"]) == []

    gone = "gone" + ".md"
    (tmp_path / "docs" / "b.md").write_text(
        f"[x]({gone})\nsee docs/{gone}\nDESIGN.md §1 to §3\n[d](../nowhere/)\n")
    (tmp_path / "n.py").write_text(
        f'"""As ../shared/DESIGN.md says (see reference/x{gone})."""\n'
        '# /work/shared/reference/notes' + '.md\n')
    assert dangling(tmp_path, ["docs/b.md", "n.py"]) == [
        f"docs/b.md:1: {gone}", f"docs/b.md:2: docs/{gone}", "docs/b.md:3: DESIGN.md §3",
        "docs/b.md:4: ../nowhere/", "n.py:1: ../shared/DESIGN.md",
        f"n.py:1: reference/x{gone}", "n.py:2: /work/shared/reference/notes.md",
    ]


def test_the_architecture_names_every_module():
    """docs/architecture.md's table of who owns what stays the whole package."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = REPO / "fem_ansible"
    missing = [m.name for m in package.glob("*.py")
               if not m.name.startswith("__") and f"`{m.name}`" not in text]
    missing += [f"legacy/{m.name}" for m in (package / "legacy").glob("*.py")
                if not m.name.startswith("__") and f"`{m.stem}`" not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"
