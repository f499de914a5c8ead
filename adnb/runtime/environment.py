"""Setting environment variables for the length of a block, and only those."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Inside the block the given variables have these values; after it each is what it was (unset if it was).

    Only the named variables are touched, so whatever else the process sets meanwhile (a library
    that exports its own settings) is left as it is.
    """
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
