"""Laying out a folder of images in the MVTec AD shape the chapters read.

Your images rarely come as ``train/good`` and ``test/<defect>``: a flat folder of good parts, a
folder of rejects, masks named some other way. ``arrange`` takes lists of files and writes the
layout (symbolic links by default, so nothing is duplicated; ``copy=True`` where links are not
allowed), naming each mask ``<image stem><mask_suffix>.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from adnb.runtime.errors import AdnbError


def _place(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def arrange(dest: str | Path, category: str, *, train: Iterable[str | Path], test_good: Iterable[str | Path] = (),
            anomalous: Mapping[str, Sequence[str | Path]] | None = None, masks: Mapping[str | Path, str | Path] | None = None,
            mask_suffix: str = "_mask", copy: bool = False) -> Path:
    """Write ``<dest>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``.

    ``anomalous`` maps a defect name to its images; ``masks`` maps an anomalous image to its mask
    file (images without an entry simply have no mask). Returns the category folder.
    """
    folder = Path(dest).expanduser() / category
    train = [Path(p) for p in train]
    if not train:
        raise AdnbError("arrange needs at least one good training image")
    masks = {Path(k): Path(v) for k, v in (masks or {}).items()}
    for split, defect, files in [("train", "good", train), ("test", "good", [Path(p) for p in test_good]),
                                 *[("test", d, [Path(p) for p in f]) for d, f in (anomalous or {}).items()]]:
        names = [p.name for p in files]
        if len(set(names)) != len(names):
            raise AdnbError(f"two files share a name in {split}/{defect}; rename them first: "
                            + ", ".join(sorted({n for n in names if names.count(n) > 1})))
        for path in files:
            if not path.is_file():
                raise AdnbError(f"{path} does not exist")
            _place(path, folder / split / defect / path.name, copy)
            if split == "test" and defect != "good" and path in masks:
                mask = masks[path]
                _place(mask, folder / "ground_truth" / defect / f"{path.stem}{mask_suffix}{mask.suffix}", copy)
    return folder
