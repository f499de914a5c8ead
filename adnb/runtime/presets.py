"""Presets: the budgets a chapter can run at, as YAML files papermill reads.

``adnb/presets/<preset>/<chapter>.yaml`` holds the parameter values of one chapter at one preset,
so ``papermill notebooks/02_fair_frequency_filters.ipynb out.ipynb -f adnb/presets/ci/fair.yaml``
works on its own. ``<chapter>`` is the short name inside the notebook's file name.

- ``ci``: every code path, a notebook in under 2 minutes on 2 CPU cores;
- ``cpu``: meaningful results on a laptop, the whole book in under 30 minutes on 2 cores;
- ``full``: the papers' settings, for a CUDA GPU and the real datasets.

A method with a chapter of its own outside the book (a third party's, ``adnb.methods.registry``)
keeps its preset files in a folder of its own laid out the same way (``MethodSpec.presets``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adnb.runtime import paths
from adnb.runtime.errors import AdnbError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def list_presets() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def chapter_key(notebook: str | Path) -> str | None:
    """The chapter's short name from a notebook (its path or its name: ``03_pyramidflow_…`` → ``pyramidflow``).

    A book chapter's name carries the name of its preset files (``adnb/presets/<preset>/<key>.yaml``)
    between underscores; a method's own chapter outside the book is its ``MethodSpec``'s.
    """
    return _chapter(notebook)[0]


def preset_file(preset: str, notebook: str | Path) -> Path | None:
    if preset not in list_presets():
        raise AdnbError(f"unknown preset {preset!r}; valid presets: {', '.join(list_presets())}")
    key, folder = _chapter(notebook)
    path = folder / preset / f"{key}.yaml"
    return path if key and path.is_file() else None


def load_preset(preset: str, notebook: str | Path) -> dict[str, Any]:
    """The parameters of ``notebook`` at ``preset`` (just ``{"preset": …}`` for a chapter without a file)."""
    path = preset_file(preset, notebook)
    values = yaml.safe_load(path.read_text()) if path else {}
    return {"preset": preset, **(values or {})}


def registered_chapter(notebook: str | Path) -> Any:
    """The ``MethodSpec`` whose own chapter (outside the book: ``MethodSpec.notebook``) is ``notebook``, a
    path or a chapter name; None if none is (this imports every method: only asked of what the book lacks)."""
    from adnb.methods.registry import names, spec

    path = Path(notebook)
    for name in names():
        method = spec(name)
        if method.notebook is not None and (method.chapter_name == path.stem.lower()
                                            or (path.suffix == ".ipynb" and method.notebook.resolve() == path.resolve())):
            return method
    return None


def _chapter(notebook: str | Path) -> tuple[str | None, Path]:
    """(chapter key, folder of its preset files) of a notebook path or chapter name."""
    path = Path(notebook)
    if path.suffix == ".ipynb" and path.resolve().parent != paths.notebooks_dir().resolve():
        method = registered_chapter(path)  # a third party's chapter
        if method is not None:
            return method.chapter_name, method.presets
    stem = f"_{path.stem.lower()}_"
    keys = [key for key in {p.stem for p in PRESETS_DIR.glob("*/*.yaml")} if f"_{key}_" in stem]
    if keys:
        return max(keys, key=len), PRESETS_DIR
    method = None if path.suffix == ".ipynb" else registered_chapter(path)
    return (method.chapter_name, method.presets) if method is not None else (None, PRESETS_DIR)
