"""The documentation's shape: a short README, links that resolve, each policy explained once."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(path: Path) -> str:
    """The file without its code blocks (a link or a phrase inside a command is not prose)."""
    return FENCE.sub("", path.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", _prose(path), re.M)}


def test_slug_matches_github():
    assert _slug("1. MCL cohort pretraining — `pretrain/main.py`") == (
        "1-mcl-cohort-pretraining--pretrainmainpy"
    )
    assert _slug("A local SLURM cluster: `tools/slurm_local.sh`") == (
        "a-local-slurm-cluster-toolsslurm_localsh"
    )


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 150, f"README.md has {n} lines; move detail to docs/"


def test_docs_exist():
    names = {p.name for p in DOCS}
    wanted = {"INSTALL.md", "GETTING_STARTED.md", "RESULTS.md", "BENCHMARKS.md", "DESIGN.md"}
    assert wanted <= names, wanted - names


def test_relative_links_resolve():
    """Every relative link in README.md and docs/*.md names an existing file, and its #anchor,
    if any, a heading of that file."""
    bad = []
    for doc in [README, *DOCS]:
        for target in LINK.findall(_prose(doc)):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{doc.name}: {target} (no such heading in {dest.name})")
    assert not bad, "\n".join(bad)


def test_unsafe_load_policy_explained_once():
    """Why --unsafe-load exists (unpickling can run code) is explained in one paragraph of one
    file; everywhere else names the flag and links there."""
    paragraphs = []
    for doc in [README, *DOCS]:
        for para in re.split(r"\n\s*\n", _prose(doc)):
            if "--unsafe-load" in para and re.search(r"unpickl", para, re.I):
                paragraphs.append(doc.name)
    assert paragraphs == ["DESIGN.md"], paragraphs
