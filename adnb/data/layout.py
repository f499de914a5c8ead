"""The dataset layout every chapter reads: MVTec AD's, and the datasets shaped like it.

::

    <root>/<category>/train/good/*.png              normal training images (BTAD: train/ok)
    <root>/<category>/test/good/*.png               normal test images     (BTAD: test/ok)
    <root>/<category>/test/<defect>/*.png           anomalous test images  (BTAD: test/ko)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   optional masks (BTAD: <stem>.png/.bmp)

MPDD uses the same layout, VisA and BTAD reach it through ``adnb.data.convert``, and a user's own
folder works as soon as it has ``train/good`` (``test`` and ``ground_truth`` are optional).
Masks pair with images by file stem plus a suffix (``_mask`` by default, found automatically);
every image or mask left without a partner is named in the error.

Images of any shape reach the model's square size by one of the resize modes of
``adnb.data.framing`` (``squash`` by default, ``letterbox``, ``tile``); with ``tile`` a split holds
one row per tile, and ``Split.origin`` says which image each row came from.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from adnb.data.framing import check_mode, frame_image, frame_mask
from adnb.data.images import IMAGE_SUFFIXES, read_image, read_mask
from adnb.runtime.errors import AdnbError

NORMAL_NAMES = ("good", "ok")
MASK_SUFFIXES = ("_mask", "")


@dataclass(frozen=True)
class Sample:
    """One image file, its label (0 good, 1 anomalous), its defect type and its mask file."""

    image: Path
    label: int
    defect: str
    mask: Path | None = None


def find_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; dotfiles and checkpoint folders are ignored."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != ".ipynb_checkpoints")


def _normal_folder(split: Path) -> Path | None:
    for name in NORMAL_NAMES:
        if (split / name).is_dir():
            return split / name
    return None


@dataclass
class Split:
    """A split loaded at model resolution: images ``N×3×S×S`` uint8, labels, masks ``N×S×S``.

    One row per model input: with ``resize="tile"`` an image gives several rows, each row's
    ``samples``/``labels`` entry repeats its image's, and ``origin[i]`` is the index of row ``i``'s
    image among ``image_samples`` (``origin`` is ``0…N−1`` for the other modes).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    samples: list[Sample]
    resize: str = "squash"
    origin: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.origin is None:
            self.origin = torch.arange(len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def float_images(self) -> torch.Tensor:
        """Images as float in [0, 1], what every model takes."""
        return self.images.float().div_(255)

    @property
    def n_images(self) -> int:
        """The number of images the rows came from (``len(self)`` unless tiled)."""
        return int(self.origin.max()) + 1 if len(self.origin) else 0

    @property
    def image_samples(self) -> list[Sample]:
        """One sample per image, indexed like ``origin``."""
        first: dict[int, Sample] = {}
        for row, image in enumerate(self.origin.tolist()):
            first.setdefault(image, self.samples[row])
        return [first[j] for j in range(self.n_images)]

    def per_image(self, row_scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Image scores from row (tile) scores: ``score_j = max_{i: origin_i = j} row_i`` (see ``framing``)."""
        rows = torch.as_tensor(row_scores).float()
        out = torch.full((self.n_images,), -torch.inf).scatter_reduce(0, self.origin, rows, "amax")
        return out.numpy()


@dataclass
class Category:
    """One category of a dataset: its training and test samples."""

    dataset: str
    name: str
    root: Path
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when the anomalous test images have ground-truth masks (pixel metrics exist)."""
        return any(s.mask is not None for s in self.test)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.test if s.label})

    def fingerprint(self) -> str:
        """A short hash of the training files (names and sizes): the cache key of trained models."""
        h = hashlib.sha256(f"{self.dataset}/{self.name}".encode())
        for s in self.train:
            h.update(f"{s.image.name}:{s.image.stat().st_size};".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        counts = Counter(s.defect for s in self.test)
        test = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
        masks = "with masks" if self.has_masks else "no masks (image-level metrics only)"
        return f"{self.dataset}/{self.name}: train {len(self.train)} good; test {len(self.test)} ({test}); {masks}"

    def load(self, split: str, image_size: int, limit: int | None = None, seed: int = 0, *,
             resize: str = "squash") -> Split:
        """Load ``"train"`` or ``"test"`` at ``image_size``; ``limit`` keeps a stratified subset.

        ``resize`` fits each image into ``image_size×image_size`` (``adnb.data.framing``):
        ``squash`` (default), ``letterbox`` or ``tile`` — every tile of every image is one row.
        """
        samples = {"train": self.train, "test": self.test}.get(split)
        if samples is None:
            raise AdnbError(f"unknown split {split!r}; valid: 'train', 'test'")
        if not samples:
            raise AdnbError(f"{self.root} has no {split} images; expected them under {self.root / split}")
        chosen = tuple(stratified_subset(samples, limit, seed))
        return _load_split(chosen, int(image_size), check_mode(resize))


def split_holdout(n: int, holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (kept, held out) of ``n`` items, ``holdout`` of them held out at random (seeded)."""
    if not 0 <= holdout < n:
        raise AdnbError(f"cannot hold out {holdout} of {n} images; lower the hold-out")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[holdout:].sort().values, perm[:holdout].sort().values


def stratified_subset(samples: Sequence[Sample], limit: int | None, seed: int = 0) -> list[Sample]:
    """At most ``limit`` samples, each defect type keeping its share (at least one each)."""
    if limit is None or limit <= 0 or limit >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.defect, []).append(s)
    quota = {k: max(1, round(limit * len(v) / len(samples))) for k, v in groups.items()}
    picked = [s for k, v in groups.items() for s in (v[i] for i in sorted(rng.permutation(len(v))[:quota[k]]))]
    order = {s: i for i, s in enumerate(samples)}
    return sorted(picked, key=order.__getitem__)


@lru_cache(maxsize=8)
def _load_split(samples: tuple[Sample, ...], size: int, resize: str = "squash") -> Split:
    def one(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(sample.image)
        tiles, framing = frame_image(image, size, resize)
        if sample.mask is None:
            return tiles, np.zeros((len(tiles), size, size), bool)
        mask = read_mask(sample.mask)
        if mask.shape != image.shape[:2]:
            raise AdnbError(f"mask {sample.mask} is {mask.shape[1]}×{mask.shape[0]} but its image {sample.image} is "
                            f"{image.shape[1]}×{image.shape[0]}; masks must have their image's size")
        return tiles, frame_mask(mask, framing)

    with ThreadPoolExecutor(max_workers=2) as pool:  # decoding releases the GIL
        pairs = list(pool.map(one, samples))
    counts = [len(p[0]) for p in pairs]
    images = torch.from_numpy(np.concatenate([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    has_masks = any(s.mask is not None for s in samples)
    masks = torch.from_numpy(np.concatenate([p[1] for p in pairs])) if has_masks else None
    rows = [s for s, k in zip(samples, counts) for _ in range(k)]
    labels = torch.tensor([s.label for s in rows])
    origin = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts))
    return Split(images, labels, masks, rows, resize, origin)


def list_categories(root: str | Path) -> list[str]:
    """Categories under ``root`` (folders with a ``train`` folder); ``[root.name]`` if root is one."""
    root = Path(root)
    if not root.is_dir():
        raise AdnbError(f"data root {root} does not exist; point data_root at a folder laid out like MVTec AD")
    if (root / "train").is_dir():
        return [root.name]
    return [p.name for p in _subfolders(root) if (p / "train").is_dir()]


def load_category(root: str | Path, category: str | None = None, *, mask_suffix: str | None = None,
                  dataset: str | None = None) -> Category:
    """Scan ``<root>/<category>`` (or ``root`` itself when it holds ``train/``) into a ``Category``.

    ``mask_suffix`` is what follows an image's stem in its mask's name (``"_mask"`` for MVTec,
    ``""`` for BTAD and VisA); ``None`` tries both and keeps the one that pairs.
    """
    root = Path(root).expanduser()
    if (root / "train").is_dir() and category in (None, "", root.name):  # the root is the category folder
        folder, category, dataset = root, root.name, dataset or root.parent.name
    else:
        folder = root / (category or "")
    if not (folder / "train").is_dir():
        valid = list_categories(root) if root.is_dir() else []
        hint = f"categories found there: {', '.join(valid)}" if valid else "no folder there has a train/ subfolder"
        raise AdnbError(f"no category {category!r} under {root} (expected {folder}/train/good); {hint}")
    normal_train = _normal_folder(folder / "train") or folder / "train"
    train = [Sample(p, 0, "good") for p in find_images(normal_train)]
    if not train:
        raise AdnbError(f"no training images in {normal_train}; put the good images there (PNG, JPG, BMP or TIFF)")
    test: list[Sample] = []
    anomalous: dict[str, list[Path]] = {}
    for sub in _subfolders(folder / "test"):
        if sub.name in NORMAL_NAMES:
            test += [Sample(p, 0, "good") for p in find_images(sub)]
        else:
            anomalous[sub.name] = find_images(sub)
    gt = folder / "ground_truth"
    masks = _pair_masks(anomalous, gt, mask_suffix) if gt.is_dir() else {}
    for defect, images in anomalous.items():
        test += [Sample(p, 1, defect, masks.get(p)) for p in images]
    return Category(dataset or root.name, category, folder, train, test)


def _pair_masks(anomalous: dict[str, list[Path]], gt: Path, suffix: str | None) -> dict[Path, Path]:
    masks = {defect: {p.stem: p for p in find_images(gt / defect)} for defect in anomalous}
    stray = [p for sub in _subfolders(gt) if sub.name not in anomalous for p in find_images(sub)]

    def attempt(sfx: str) -> tuple[dict[Path, Path], list[Path], list[Path]]:
        paired, orphans, used = {}, [], set()
        for defect, images in anomalous.items():
            for image in images:
                mask = masks[defect].get(image.stem + sfx)
                if mask is None:
                    orphans.append(image)
                else:
                    paired[image] = mask
                    used.add(mask)
        unused = [m for d in masks.values() for m in d.values() if m not in used] + stray
        return paired, orphans, unused

    tried = [attempt(s) for s in ([suffix] if suffix is not None else MASK_SUFFIXES)]
    paired, orphans, unused = min(tried, key=lambda t: len(t[1]) + len(t[2]))
    if orphans or unused:
        sfx = repr(suffix) if suffix is not None else " or ".join(repr(s) for s in MASK_SUFFIXES)
        lines = [f"masks in {gt} do not pair with the anomalous test images (mask name = image stem + {sfx}):"]
        if orphans:
            lines.append(f"  {len(orphans)} image(s) without a mask: " + ", ".join(str(p.relative_to(gt.parent)) for p in orphans))
        if unused:
            lines.append(f"  {len(unused)} mask(s) without an image: " + ", ".join(str(p.relative_to(gt.parent)) for p in unused))
        lines.append("  fix the names, pass mask_suffix=..., or remove ground_truth/ to evaluate image-level metrics only")
        raise AdnbError("\n".join(lines))
    return paired
