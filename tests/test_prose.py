"""The book's prose states only what its build produced or what a cited paper says.

A heuristic: in every chapter's markdown cells and every book page, a sentence that still holds a
number once glue roles (``{glue:…}`…```), code spans, math, fenced blocks, links' targets and
names with digits in them (``fp32``, ``ResNet-34``, ``8-connected``) are set aside must cite a paper
(an author "et al.", a venue, a table, a figure, a section) or sit in a table of paper figures;
else it is a claim no build can keep true. ``ALLOWED`` lists the exceptions, each with why. It
also refuses citations a reader cannot follow: this project's tracker and internal documents.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from adnb.runtime.paths import REPO_ROOT

PAGES = sorted((REPO_ROOT / "book").glob("*.md"))
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))

# A sentence citing a paper (or a method's official code, a public repository) may quote its numbers.
CITATION = re.compile(r"et al\.|\b(CVPR|ICCV|ECCV|IJCV|WACV|NeurIPS|ICLR|ICML|AAAI|VAND|arXiv|TPAMI|TIP)\b|"
                      r"\bTables?\s|\bFig(ure|s)?\.?\s|§|\bEqs?\.\s|\bsupplement|\bthe paper|paper's|papers'|"
                      r"\bofficial\b|\(the paper|\(paper", re.IGNORECASE)
# Numbers that are part of a name, a unit of a definition or an enumeration, not a claim.
NAME = re.compile(r"[A-Za-z_][\w.+-]*\d[\w.+-]*|\d+(-D|D|st|nd|rd|th)\b|\d+-(connected|channel|bit|order|fold|dimensional)\b|"
                  r"\b(sections?|chapters?)\s+\d+(\s*(,|and|or)\s*\d+)*|\b(\d{1,2})×\6\b", re.IGNORECASE)
UNCLAIMED = re.compile(r"\{glue:[a-z]+\}`[^`]*`|\{(doc|ref|cite|numref|eq)\}`[^`]*`|``[^`]*``|`[^`]*`|"
                       r"\$\$.*?\$\$|\$[^$]*\$|\]\([^)]*\)|<[^>]+>", re.DOTALL)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
ENUMERATION = re.compile(r"^\s*(#+\s*)?\d+[.)]\s", re.MULTILINE)
# This project's tracker and internal documents; an issue of a method's public repository can be opened.
UNREADABLE = re.compile(r"issue #\d+\b(?! of the official repository)|methods-spec|book-conventions|architecture\.md|"
                        r"contract\.md", re.IGNORECASE)

# The one list of exceptions: (file name or "*" for every file, a piece of the sentence) → why a
# number may stand there.
ALLOWED = {
    ("*", "95 % interval"): "the level of every interval: a definition, not a result",
    ("setup.md", "Python 3.11"): "a requirement, not a result",
}


def sentences(markdown: str) -> list[str]:
    text = ENUMERATION.sub(" ", FENCE.sub(" ", markdown))
    text = UNCLAIMED.sub(" ", text)
    text = NAME.sub(" ", text)
    units = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith("|"):
            units.append(block)  # a table is judged whole: it cites a paper, or it has no number
            continue
        units += re.split(r"(?<=[.!?])\s+(?=[A-Z*(])", " ".join(block.split()))
    return units


def markdown_of(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text()
    nb = nbformat.read(path, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def unsupported(path: Path) -> list[str]:
    """The sentences of ``path`` holding a number with nothing to support it."""
    allowed = [piece for (name, piece) in ALLOWED if name in (path.name, "*")]
    out = []
    for sentence in sentences(markdown_of(path)):
        if re.search(r"\d", sentence) and not CITATION.search(sentence) and not any(a in sentence for a in allowed):
            out.append(sentence)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=lambda p: p.name)
def test_every_number_in_the_prose_is_glued_or_cited(path):
    found = unsupported(path)
    assert not found, f"{path.name}: a number neither glued from the build nor cited:\n  " + "\n  ".join(found)


@pytest.mark.parametrize("path", NOTEBOOKS + PAGES, ids=lambda p: p.name)
def test_no_citation_a_reader_cannot_open(path):
    found = UNREADABLE.findall(markdown_of(path))
    assert not found, f"{path.name} cites what readers cannot open: {found}"


def test_the_heuristic_catches_what_it_should():
    assert unsupported_text("The whole book runs in under half an hour on 2 cores.")
    assert unsupported_text("It scores 0.982 here.")
    assert not unsupported_text("It scores {glue:text}`x:.3f` here, with `epochs=3` and $D_0 = 30$.")
    assert not unsupported_text("The paper reports 0.940 (Liu et al., Table 1).")
    assert not unsupported_text("A 2-D spectrum, fp32 and ResNet-34, 8-connected regions.")
    assert not unsupported_text("| method | AUPRO |\n|---|---|\n| FAIR (the paper) | 0.940 |")
    assert unsupported_text("| method | AUPRO |\n|---|---|\n| FAIR | 0.940 |")
    assert UNREADABLE.search("for this book's issue #4") and UNREADABLE.search("see `methods-spec` §1.4")
    assert not UNREADABLE.search("issue #13 of the official repository")


def unsupported_text(markdown: str) -> list[str]:
    return [s for s in sentences(markdown) if re.search(r"\d", s) and not CITATION.search(s)]
