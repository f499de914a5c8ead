"""Converters into the MVTec AD layout: VisA (from its official ``split_csv/1cls.csv``).

BTAD and MPDD need no conversion: ``load_category`` reads them as they come (BTAD's ``ok``/``ko``
folders and its masks named like their images, some ``.bmp``).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np

from adnb.data.images import read_mask
from adnb.runtime.errors import AdnbError

VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def convert_visa(source: str | Path, dest: str | Path, split_csv: str = "split_csv/1cls.csv") -> list[str]:
    """Lay VisA out as MVTec AD under ``dest``; returns the categories written.

    Rows of ``1cls.csv`` (object, split, label, image, mask) become
    ``<object>/train/good``, ``<object>/test/good``, ``<object>/test/bad`` and
    ``<object>/ground_truth/bad/<stem>_mask.png``. VisA's masks mark defects with small
    non-zero values, not 255: they are binarised here (any non-zero → 255), otherwise a loader
    that divides by 255 and casts to uint8 would see empty masks.
    """
    source, dest = Path(source).expanduser(), Path(dest).expanduser()
    table = source / split_csv
    if not table.is_file():
        raise AdnbError(f"no {split_csv} under {source}; download VisA with its split files "
                        "(amazon-science/spot-diff, 'split_csv/1cls.csv') and point the converter at its root")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in VISA_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise AdnbError(f"{table} lacks the column(s) {', '.join(missing)}; expected {', '.join(VISA_COLUMNS)}")
    for row in rows:
        normal = row["label"].strip().lower() == "normal"
        folder = "good" if normal else "bad"
        image = source / row["image"]
        out = dest / row["object"] / ("train" if row["split"].strip().lower() == "train" else "test") / folder / image.name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, out)
        if not normal and row.get("mask"):
            gt = dest / row["object"] / "ground_truth" / "bad" / f"{image.stem}_mask.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(gt), read_mask(source / row["mask"]).astype(np.uint8) * 255)
    return sorted({row["object"] for row in rows})
