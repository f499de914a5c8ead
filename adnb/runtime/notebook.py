"""The few lines every chapter starts with: open the data, print the effective configuration."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adnb import __version__
from adnb.data import Category, default_dataset, list_categories, load_category
from adnb.runtime.device import describe


def open_categories(data_root: str = "", category: str = "", mask_suffix: str | None = None) -> list[Category]:
    """The categories a chapter runs on.

    ``data_root=""`` means the embedded dataset (generated on first use); ``category=""`` means
    every category under the root. ``mask_suffix=None`` finds the mask naming automatically.
    """
    root = Path(data_root).expanduser() if data_root else default_dataset()
    names = [category] if category else list_categories(root)
    dataset = None if data_root else "embedded"
    return [load_category(root, name, mask_suffix=mask_suffix, dataset=dataset) for name in names]


def show_setup(preset: str, device: torch.device, categories: list[Category] | None = None, **items: Any) -> None:
    """Print the effective configuration of this run: preset, device, data, and any config objects."""
    print(f"adnb {__version__} · torch {torch.__version__} · python {platform.python_version()}")
    print(f"preset: {preset}    device: {describe(device)}")
    for category in categories or []:
        print(f"data: {category.describe()}")
    for name, value in items.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = ", ".join(f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value))
            print(f"{name}: {type(value).__name__}({fields})")
        else:
            print(f"{name}: {value!r}")


def glue(name: str, value: Any, display: bool = False) -> None:
    """myst-nb's ``glue`` with numpy scalars turned into Python numbers.

    numpy 2 writes ``np.float64(0.5)`` as a scalar's repr, which ``{glue:text}`` formats cannot parse.
    """
    from myst_nb import glue as myst_glue

    myst_glue(name, value.item() if isinstance(value, np.generic) else value, display=display)
