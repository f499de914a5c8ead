"""Where adnb keeps what it makes: generated data, trained weights, results records.

Everything lives under one home folder, ``$ADNB_HOME`` (default ``~/.cache/adnb``). The Makefile
points it at ``.adnb/`` inside the checkout so a clone is self-contained.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def home() -> Path:
    return Path(os.environ.get("ADNB_HOME") or Path.home() / ".cache" / "adnb").expanduser()


def data_dir() -> Path:
    return home() / "data"


def cache_dir() -> Path:
    return home() / "weights"


def results_dir() -> Path:
    return home() / "results"


def notebooks_dir() -> Path:
    """The source notebooks of the book (in a checkout of the repository)."""
    return REPO_ROOT / "notebooks"
