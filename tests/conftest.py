"""Tests run in batch mode: no progress bars, no widgets (as papermill and CI runs do)."""

import os

os.environ.setdefault("ADNB_BATCH", "1")
