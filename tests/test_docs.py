"""The documents hold together: README.md stays a front door (at most 200 lines, its two commands as
they are), every relative link in README.md, docs/*.md and every folder's README leads to a file of the
repository (and, with a #fragment, to a heading of it), every repository path they name in backticks
exists (from the root, or from the document's own folder), and each document in docs/ opens by saying
what it answers.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Every folder's README too (bench/, tests/, demo/training/, the chat page's vendor/, …): each is a document.
FOLDER_READMES = sorted(p for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and not d.name.endswith(".egg-info") and d.name not in ("build", "dist")
                        for p in d.rglob("README.md"))
DOCUMENTS = [README, *DOCS, *FOLDER_READMES]
MAX_README_LINES = 200
# The newcomer's two commands: a test (tests/test_demo.py) and CI (.ci/run) do what they say.
COMMANDS = ("python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/qwen35 demo",
            "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A repository path as a document names it: folders and a file name with a known extension.
REPO_PATH = re.compile(r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)+\.(?:py|md|toml|json|jinja|txt)")
# Paths the documents name that are not ours to hold: another project's files, and placeholders.
NOT_OURS = {"examples/server/server.py": "the llama-cpp-python sdist's example server",
            "path/to/mine.toml": "a placeholder for the reader's own profile"}


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _without_code_blocks(path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def _relative_links(path: Path) -> list[str]:
    targets = LINK.findall(_without_code_blocks(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.\-]*:", t)]  # not http:, mailto:, …


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_documents():
    assert README.is_file()
    assert DOCS, "docs/ holds no documents"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES}"


def test_readme_keeps_its_two_commands():
    text = README.read_text()
    for command in COMMANDS:
        assert f"\n{command}\n" in text, f"README.md lost the command {command!r}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_relative_links_lead_to_files_and_headings(path):
    broken = []
    for target in _relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {_name(dest)}")
        elif not str(dest).startswith(str(ROOT)):
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{_name(path)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_repository_paths_named_exist(path):
    missing = []
    for span in CODE_SPAN.findall(path.read_text()):
        for found in REPO_PATH.finditer(span):
            name, start = found.group(0), found.start()
            if start and span[start - 1] in "/~.$<":  # absolute, home, hidden or a placeholder: not ours
                continue
            if name not in NOT_OURS and not (ROOT / name).exists() and not (path.parent / name).exists():
                missing.append(name)
    assert not missing, f"{_name(path)} names files that are not in the repository: {', '.join(sorted(set(missing)))}"


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_each_document_says_what_it_answers(path):
    paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    assert paragraphs[0].startswith("# "), f"{_name(path)} does not open with a title"
    assert paragraphs[1].startswith("This document answers:"), \
        f"{_name(path)} does not open by saying what it answers"
