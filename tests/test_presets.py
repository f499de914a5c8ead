"""One source of truth per preset: a chapter opened in JupyterLab is the ``cpu`` book's run.

A chapter's parameters cell holds the ``cpu`` preset's values (the contract, "Presets and
notebooks"): run without papermill (JupyterLab, ``jupyter execute``) it sees only those defaults,
while ``python -m adnb run CHAPTER --preset cpu`` and ``make book`` see defaults ⊕ ``cpu/<chapter>.yaml``.
The two agree only if every key of the YAML equals its default, value and type (papermill injects
the YAML's type: 30 and 30.0 hash differently). ``tests/lab_style.py`` measures the same on a built
cpu book: a lab-style run of each chapter trains nothing.
"""

from __future__ import annotations

import pytest

from adnb.methods import names
from adnb.methods.base import Prepared
from adnb.recipe import Recipe, chapter_of
from adnb.runtime.presets import chapter_key, load_preset
from adnb.runtime.runner import chapter_parameters, notebook_defaults, toc_chapters

CHAPTERS = [source for source, _ in toc_chapters()]  # the book's source notebooks


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_cell_holds_the_cpu_preset(source):
    defaults = notebook_defaults(source)
    differ = {key: (defaults.get(key, "(no such parameter)"), value) for key, value in load_preset("cpu", source).items()
              if key not in defaults or defaults[key] != value or type(defaults[key]) is not type(value)}
    assert not differ, (f"{source.name}: the parameters cell and adnb/presets/cpu/{chapter_key(source)}.yaml differ "
                        f"(key: (notebook, cpu preset)): {differ}; the cpu preset's value is the book's, so the cell takes it")


@pytest.mark.parametrize("method", names())
def test_a_lab_run_resolves_the_cpu_books_configuration(method):
    """What a chapter's first cell builds from its own defaults (no papermill) is the recipe
    ``python -m adnb run`` and ``train`` build at the cpu preset: same parameters, config and config hash."""
    chapter = chapter_of(method)
    lab = Recipe(method, chapter_parameters(chapter, notebook_defaults(chapter)), device="cpu")
    book = Recipe.from_preset(method, "cpu", device="cpu")
    assert lab.params == book.params
    # the prepared inputs (RealNet's SDAS images) follow from the parameters: one placeholder serves both
    assert lab.config_hash(lab.config(), Prepared()) == book.config_hash(book.config(), Prepared())
