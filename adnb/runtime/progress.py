"""Progress bars that help a reader at the keyboard and stay out of batch runs and the book.

Interactive sessions get ``tqdm.auto`` bars. Batch runs (papermill, pytest, CI) set
``ADNB_BATCH=1`` and get none, so no widget state or carriage-return debris reaches the HTML.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def is_batch() -> bool:
    """True inside non-interactive runs (the runner, the tests, CI)."""
    return os.environ.get("ADNB_BATCH", "") not in ("", "0") or os.environ.get("TQDM_DISABLE", "") not in ("", "0")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm`` that is silent in batch runs."""
    kwargs.setdefault("leave", False)
    kwargs["disable"] = kwargs.get("disable", False) or is_batch()
    return tqdm(iterable, **kwargs)
