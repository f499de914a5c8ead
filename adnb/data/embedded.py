"""The embedded dataset: four procedurally drawn categories in MVTec AD layout, with exact masks.

What ``make book`` and the tests use when no data root is given. Nothing is downloaded: every
image is drawn from a seed, so the same seed gives the same files on any machine.

- **weave** (texture): a woven fabric with random thread period, angle, fibre noise and lighting.
- **stone** (texture): veined stone from fractal noise; vein direction and colour vary per image.
- **washer** (object): a brushed-metal ring with a key notch, posed (shift, rotation) and lit
  from a random direction.
- **capsule** (object): a two-tone printed capsule, posed and lit at random.

Each category has four defect types, structural (scratch, crack, hole, missing part, cut) and
surface (stain, colour, contamination). A defect changes exactly the pixels of its mask.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from adnb.runtime import paths

VERSION = 1
CATEGORIES = ("weave", "stone", "washer", "capsule")
KIND = {"weave": "texture", "stone": "texture", "washer": "object", "capsule": "object"}
DEFECTS = {
    "weave": ("hole", "cut", "stain", "contamination"),
    "stone": ("crack", "scratch", "stain", "colour"),
    "washer": ("scratch", "missing_part", "stain", "contamination"),
    "capsule": ("crack", "missing_part", "colour", "contamination"),
}
DEFECT_FAMILY = {"scratch": "structural", "crack": "structural", "hole": "structural", "cut": "structural",
                 "missing_part": "structural", "stain": "surface", "colour": "surface", "contamination": "surface"}

Image = np.ndarray  # H×W×3 float32 in [0, 1]
Mask = np.ndarray  # H×W bool


@dataclass(frozen=True)
class EmbeddedSpec:
    """How big the embedded dataset is; the defaults are what the book uses."""

    seed: int = 0
    size: int = 256
    n_train: int = 100
    n_test_good: int = 12
    n_test_per_defect: int = 7

    def __post_init__(self) -> None:
        if self.size < 64:
            raise ValueError(f"the embedded dataset is drawn at 64 px or more (got {self.size})")

    @property
    def folder_name(self) -> str:
        return f"adnb-embedded-v{VERSION}-s{self.seed}-{self.size}px-{self.n_train}"


# --------------------------------------------------------------------------- noise and shapes


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise: a ``cells×cells`` random grid upsampled bicubically, in about [0, 1]."""
    coarse = rng.random((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(coarse, (size * (cells + 3) // cells,) * 2, interpolation=cv2.INTER_CUBIC)
    o = size // cells
    return big[o:o + size, o:o + size]


def fractal_noise(rng: np.random.Generator, size: int, octaves: int = 5, base: int = 4) -> np.ndarray:
    total, amp, norm = np.zeros((size, size), np.float32), 1.0, 0.0
    for k in range(octaves):
        total += amp * smooth_noise(rng, size, base * 2**k)
        norm += amp
        amp *= 0.5
    return total / norm


def blob(rng: np.random.Generator, size: int, center: tuple[float, float], radius: float, rough: float = 0.4) -> Mask:
    """An irregular blob: a disc whose edge is pushed in and out by smooth noise."""
    y, x = _grid(size)
    d = np.hypot(y - center[0], x - center[1]) / radius
    return d + rough * (smooth_noise(rng, size, 8) - 0.5) * 2 < 1


def curve_mask(size: int, points: np.ndarray, thickness: int) -> Mask:
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], False, 1, int(thickness), cv2.LINE_8)
    return canvas.astype(bool)


def bezier(rng: np.random.Generator, start: np.ndarray, length: float, bend: float = 0.4, n: int = 40) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    ctrl = (start + end) / 2 + bend * length * rng.uniform(-1, 1, 2)
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end


def random_walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float) -> np.ndarray:
    heading = rng.uniform(0, 2 * np.pi)
    pts = [start]
    for _ in range(steps):
        heading += rng.uniform(-0.6, 0.6)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(pts)


def _point_in(rng: np.random.Generator, region: Mask, margin: int = 12) -> np.ndarray:
    """A random (x, y) point inside ``region``, away from the border."""
    inner = region.copy()
    inner[:margin], inner[-margin:], inner[:, :margin], inner[:, -margin:] = False, False, False, False
    ys, xs = np.nonzero(inner if inner.any() else region)
    i = rng.integers(len(ys))
    return np.array([xs[i], ys[i]], np.float32)


def _light(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A directional lighting field around 1 (the same light falls on object and background)."""
    y, x = _grid(size)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.cos(a) + (y - size / 2) * np.sin(a)) / size
    return (rng.uniform(0.9, 1.1) * (1 + strength * ramp))[..., None].astype(np.float32)


# --------------------------------------------------------------------------- normal images


def weave(rng: np.random.Generator, size: int) -> tuple[Image, Mask, Image]:
    y, x = _grid(size)
    period, a = rng.uniform(10, 13), np.deg2rad(rng.uniform(-4, 4))
    u = (x * np.cos(a) + y * np.sin(a)) / period + rng.uniform(0, 2)
    v = (-x * np.sin(a) + y * np.cos(a)) / period + rng.uniform(0, 2)
    over = (np.floor(u) + np.floor(v)) % 2
    bump = np.where(over > 0, np.sin(np.pi * (u % 1)), np.sin(np.pi * (v % 1))) ** 0.7
    fibre = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.8)
    base = np.array([0.62, 0.52, 0.40], np.float32) + rng.normal(0, 0.02, 3).astype(np.float32)
    shade = 0.55 + 0.4 * bump + 0.05 * fibre
    image = shade[..., None] * base * _light(rng, size, 0.15)
    return image, np.ones((size, size), bool), image


def stone(rng: np.random.Generator, size: int) -> tuple[Image, Mask, Image]:
    y, x = _grid(size)
    n = fractal_noise(rng, size)
    theta, freq = rng.uniform(0, np.pi), rng.uniform(2.5, 4.5)
    phase = 2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) / size + 7 * n
    veins = np.exp(-(np.sin(phase) / 0.12) ** 2)
    light = np.array([0.80, 0.78, 0.74], np.float32) + rng.normal(0, 0.015, 3).astype(np.float32)
    dark = np.array([0.45, 0.44, 0.46], np.float32)
    image = light * (1 - 0.35 * n[..., None]) + (dark - light) * 0.55 * veins[..., None]
    image = image * _light(rng, size, 0.1)
    return image, np.ones((size, size), bool), image


def _pose(rng: np.random.Generator, size: int, shift: float, degrees: float) -> np.ndarray:
    angle = rng.uniform(-degrees, degrees)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    m[:, 2] += rng.uniform(-shift, shift, 2)
    return m


def _place(rng: np.random.Generator, canvas: Image, alpha: np.ndarray, background: Image, shift: float,
           degrees: float, light: float) -> tuple[Image, Mask, Image]:
    """Pose the object drawn in the canonical frame, composite it and light the whole scene.

    Returns the image, the object's mask and the lit scene without the object (what a missing
    part reveals)."""
    size = canvas.shape[0]
    m = _pose(rng, size, shift, degrees)
    warped = cv2.warpAffine(canvas, m, (size, size), flags=cv2.INTER_LINEAR)
    a = cv2.warpAffine(alpha, m, (size, size), flags=cv2.INTER_LINEAR)[..., None]
    gain = _light(rng, size, light)
    return (warped * a + background * (1 - a)) * gain, a[..., 0] > 0.5, background * gain


def washer(rng: np.random.Generator, size: int) -> tuple[Image, Mask, Image]:
    y, x = _grid(size)
    c = size / 2
    d, phi = np.hypot(y - c, x - c), np.arctan2(y - c, x - c)
    outer, inner = size * rng.uniform(0.32, 0.335), size * 0.135
    alpha = np.clip(outer - d + 0.5, 0, 1) * np.clip(d - inner + 0.5, 0, 1)
    notch = (np.abs(phi + np.pi / 2) < 0.09) & (d > outer - size * 0.05)
    alpha[notch] = 0
    brushed = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.2)
    rings = 0.03 * np.sin(d * 1.7) + 0.04 * brushed
    bevel = 1 - 0.25 * np.exp(-((d - outer) / 3) ** 2) - 0.25 * np.exp(-((d - inner) / 3) ** 2)
    shade = (0.55 + 0.12 * np.cos(phi - rng.uniform(0, 2 * np.pi)) + rings) * bevel
    metal = shade[..., None] * np.array([0.95, 0.97, 1.0], np.float32)
    background = (0.16 + 0.02 * smooth_noise(rng, size, 6))[..., None] * np.ones(3, np.float32)
    return _place(rng, metal.astype(np.float32), alpha.astype(np.float32), background, size * 0.03, 15, 0.3)


def capsule(rng: np.random.Generator, size: int) -> tuple[Image, Mask, Image]:
    y, x = _grid(size)
    c = size / 2
    half, radius = size * 0.27, size * 0.1
    u, v = x - c, y - c
    sdf = np.hypot(np.maximum(np.abs(u) - half, 0), v) - radius
    alpha = np.clip(0.5 - sdf, 0, 1)
    shell = np.where(u[..., None] < 0, np.array([0.78, 0.30, 0.16], np.float32), np.array([0.92, 0.88, 0.78], np.float32))
    across = np.clip(v / radius, -1, 1)
    shade = 0.55 + 0.4 * np.sqrt(1 - across**2) + 0.25 * np.exp(-((across + 0.45) / 0.12) ** 2)
    canvas = (shell * shade[..., None]).astype(np.float32)
    text = np.zeros((size, size), np.uint8)
    cv2.putText(text, "AD 25", (int(c + half * 0.1), int(c + radius * 0.3)), cv2.FONT_HERSHEY_SIMPLEX,
                size / 700, 1, max(1, size // 160), cv2.LINE_AA)
    canvas *= 1 - 0.55 * text[..., None].astype(np.float32)
    background = (0.80 + 0.02 * smooth_noise(rng, size, 6))[..., None] * np.array([1.0, 1.0, 0.98], np.float32)
    return _place(rng, canvas, alpha.astype(np.float32), background, size * 0.025, 8, 0.25)


DRAW: dict[str, Callable[[np.random.Generator, int], tuple[Image, Mask, Image]]] = {
    "weave": weave, "stone": stone, "washer": washer, "capsule": capsule}


# --------------------------------------------------------------------------- defects


def _scratch(rng, image, region):  # noqa: ANN001, ANN202 - the defect functions share one signature
    size = image.shape[0]
    mask = curve_mask(size, bezier(rng, _point_in(rng, region), rng.uniform(25, 90)), int(rng.integers(1, 3))) & region
    sign = 1 if image[mask].mean() < 0.55 else -1
    image[mask] = np.clip(image[mask] + sign * rng.uniform(0.12, 0.25), 0, 1)
    return mask


def _cut(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    start = _point_in(rng, region)
    angle, length = rng.uniform(0, np.pi), rng.uniform(20, 60)
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    mask = curve_mask(size, np.stack([start, end]), int(rng.integers(2, 4))) & region
    image[mask] = image[mask] * rng.uniform(0.25, 0.45)
    return mask


def _crack(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    start = _point_in(rng, region)
    path = random_walk(rng, start, int(rng.integers(8, 20)), rng.uniform(3, 6))
    mask = curve_mask(size, path, int(rng.integers(1, 3)))
    if rng.random() < 0.6:
        branch = random_walk(rng, path[len(path) // 2], int(rng.integers(4, 9)), 4)
        mask |= curve_mask(size, branch, 1)
    mask &= region
    image[mask] = image[mask] * rng.uniform(0.35, 0.6)
    return mask


def _hole(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    cx, cy = _point_in(rng, region)
    mask = blob(rng, size, (cy, cx), rng.uniform(5, 14), rough=0.25) & region
    backing = rng.uniform(0.08, 0.2) + 0.03 * rng.standard_normal(mask.sum())
    image[mask] = np.clip(backing, 0, 1)[:, None] * np.array([1.0, 0.95, 0.9], np.float32)
    return mask


def _missing_part(rng, image, region, background):  # noqa: ANN001, ANN202
    size = image.shape[0]
    edge = region & ~cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    edge[:16], edge[-16:], edge[:, :16], edge[:, -16:] = False, False, False, False
    cx, cy = _point_in(rng, edge, margin=0)
    mask = blob(rng, size, (cy, cx), rng.uniform(10, 22), rough=0.3) & region
    image[mask] = background[mask]
    return mask


def _stain(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    cx, cy = _point_in(rng, region)
    mask = blob(rng, size, (cy, cx), rng.uniform(8, 22)) & region
    tint = np.array(rng.choice([[0.35, 0.25, 0.12], [0.2, 0.22, 0.25], [0.5, 0.42, 0.2]]), np.float32)
    opacity = (rng.uniform(0.2, 0.45) * (0.7 + 0.6 * smooth_noise(rng, size, 10)))[mask][:, None]
    image[mask] = image[mask] * (1 - opacity) + tint * opacity
    return mask


def _colour(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    cx, cy = _point_in(rng, region)
    mask = blob(rng, size, (cy, cx), rng.uniform(10, 26)) & region
    gain = np.clip(1 + rng.choice([-1, 1], 3) * rng.uniform(0.1, 0.22, 3), 0, 2).astype(np.float32)
    image[mask] = np.clip(image[mask] * gain, 0, 1)
    return mask


def _contamination(rng, image, region):  # noqa: ANN001, ANN202
    size = image.shape[0]
    if rng.random() < 0.5:  # a fibre
        mask = curve_mask(size, bezier(rng, _point_in(rng, region), rng.uniform(15, 45), bend=0.8), 1)
    else:  # a few specks
        mask = np.zeros((size, size), bool)
        y, x = _grid(size)
        centre = _point_in(rng, region)
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = centre + rng.normal(0, 8, 2)
            mask |= np.hypot(x - cx, y - cy) < rng.uniform(1.5, 3.5)
    mask &= region
    image[mask] = np.array([0.22, 0.15, 0.08], np.float32) * rng.uniform(0.6, 1.2)
    return mask


def add_defect(rng: np.random.Generator, defect: str, image: Image, region: Mask, background: Image) -> tuple[Image, Mask]:
    """Draw ``defect`` inside ``region``; returns the new image and exactly the changed pixels."""
    for _ in range(20):
        out = image.copy()
        if defect == "missing_part":
            mask = _missing_part(rng, out, region, background)
        else:
            mask = {"scratch": _scratch, "cut": _cut, "crack": _crack, "hole": _hole, "stain": _stain,
                    "colour": _colour, "contamination": _contamination}[defect](rng, out, region)
        if mask.sum() >= 4:
            return out, mask
    raise RuntimeError(f"could not place a {defect} defect")  # pragma: no cover - regions are never that small


# --------------------------------------------------------------------------- writing the dataset


def _render(category: str, spec: EmbeddedSpec, split: str, index: int, defect: str) -> tuple[np.ndarray, np.ndarray | None]:
    cat_id, split_id = CATEGORIES.index(category), ("train", "test").index(split)
    rng = np.random.default_rng([spec.seed, VERSION, cat_id, split_id, index])
    image, region, backdrop = DRAW[category](rng, spec.size)
    image = np.clip(image + rng.normal(0, 0.008, image.shape).astype(np.float32), 0, 1)
    mask = None
    if defect != "good":
        image, mask = add_defect(rng, defect, image, region, backdrop)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def _write_category(args: tuple[str, EmbeddedSpec, Path]) -> None:
    category, spec, root = args
    jobs = [("train", i, "good") for i in range(spec.n_train)]
    jobs += [("test", i, "good") for i in range(spec.n_test_good)]
    jobs += [("test", spec.n_test_good + k * spec.n_test_per_defect + i, d)
             for k, d in enumerate(DEFECTS[category]) for i in range(spec.n_test_per_defect)]
    counters: dict[tuple[str, str], int] = {}
    for split, index, defect in jobs:
        image, mask = _render(category, spec, split, index, defect)
        n = counters[(split, defect)] = counters.get((split, defect), -1) + 1
        folder = root / category / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{n:03d}.png"), image[:, :, ::-1])
        if mask is not None:
            gt = root / category / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(gt / f"{n:03d}_mask.png"), mask.astype(np.uint8) * 255)


def generate(root: str | Path, spec: EmbeddedSpec = EmbeddedSpec(), workers: int = 2) -> Path:
    """Write the embedded dataset under ``root`` (MVTec AD layout) and return ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(c, spec, root) for c in CATEGORIES]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_write_category, jobs))
    else:
        for job in jobs:
            _write_category(job)
    manifest = {"name": "adnb-embedded", "version": VERSION, **asdict(spec), "categories": {
        c: {"kind": KIND[c], "defects": {d: DEFECT_FAMILY[d] for d in DEFECTS[c]}} for c in CATEGORIES}}
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return root


def default_dataset(spec: EmbeddedSpec = EmbeddedSpec(), root: str | Path | None = None) -> Path:
    """The embedded dataset's root folder, generated on first use (safe with concurrent callers)."""
    base = Path(root) if root else paths.data_dir()
    target = base / spec.folder_name
    if (target / "dataset.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{spec.folder_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "dataset.json").is_file():
            tmp = base / f".{spec.folder_name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            generate(tmp, spec)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target
