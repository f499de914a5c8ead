"""User-facing errors: one clear message that names the thing and the fix, no traceback soup."""

from __future__ import annotations


class AdnbError(Exception):
    """An error a user can act on. Its message says what went wrong and how to fix it.

    The CLI prints only the message; IPython (notebooks, JupyterLab) does the same through
    ``_render_traceback_``, so a reader sees the sentence that matters instead of a stack dump.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]


class OfflineError(AdnbError):
    """Weights or data live on a server this machine cannot reach."""


class TrainingInterrupted(AdnbError):
    """Training stopped early; the last checkpoint is kept and a re-run resumes from it."""
