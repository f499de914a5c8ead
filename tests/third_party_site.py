"""Installing the test suite's third-party method (``tests/fixtures/third_party/tiny_method``) into a folder,
as pip would: the package and a ``.dist-info`` whose entry point in the group ``adnb.methods`` names it.

A process with that folder on its path (``sys.path``, or ``PYTHONPATH`` for the processes it starts:
chapters' kernels, train-all's workers, the nodes of a Ray cluster) finds the method ``tiny``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from adnb.methods.registry import ENTRY_POINT_GROUP

PACKAGE = Path(__file__).resolve().parent / "fixtures" / "third_party" / "tiny_method"


def install(site: Path) -> Path:
    """``tiny_method`` copied into ``site`` with its distribution metadata; returns ``site``."""
    shutil.copytree(PACKAGE, site / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "tiny_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntiny = {PACKAGE.name}\n")
    return site
