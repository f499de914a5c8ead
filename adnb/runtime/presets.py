"""Presets: the budgets a chapter can run at, as YAML files papermill reads.

``adnb/presets/<preset>/<chapter>.yaml`` holds the parameter values of one chapter at one preset,
so ``papermill notebooks/02_fair_frequency_filters.ipynb out.ipynb -f adnb/presets/ci/fair.yaml``
works on its own. ``<chapter>`` is the short name inside the notebook's file name.

- ``ci``: every code path, a notebook in under 2 minutes on 2 CPU cores;
- ``cpu``: meaningful results on a laptop, the whole book in under 30 minutes on 2 cores;
- ``full``: the papers' settings, for a CUDA GPU and the real datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adnb.runtime.errors import AdnbError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
CHAPTERS = ("data", "fair", "pyramidflow", "d3ad", "realnet", "benchmark", "own_dataset")


def list_presets() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def chapter_key(notebook: str | Path) -> str | None:
    """The chapter's short name from a notebook file name (``03_pyramidflow_…`` → ``pyramidflow``)."""
    stem = Path(notebook).stem.lower()
    for key in sorted(CHAPTERS, key=len, reverse=True):
        if f"_{key}" in f"_{stem}" :
            return key
    return None


def preset_file(preset: str, notebook: str | Path) -> Path | None:
    if preset not in list_presets():
        raise AdnbError(f"unknown preset {preset!r}; valid presets: {', '.join(list_presets())}")
    key = chapter_key(notebook)
    path = PRESETS_DIR / preset / f"{key}.yaml"
    return path if key and path.is_file() else None


def load_preset(preset: str, notebook: str | Path) -> dict[str, Any]:
    """The parameters of ``notebook`` at ``preset`` (just ``{"preset": …}`` for a chapter without a file)."""
    path = preset_file(preset, notebook)
    values = yaml.safe_load(path.read_text()) if path else {}
    return {"preset": preset, **(values or {})}
