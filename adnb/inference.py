"""Scoring new images with a trained checkpoint, at each image's own resolution, in constant memory.

>>> scorer = Scorer.from_checkpoint("…/weights.pt")
>>> result = scorer("part_0042.png")       # a path, or an H×W×3 / H×W array
>>> result.score, result.map.shape         # map at the image's own size
>>> result.normalised, result.anomalous    # from the checkpoint's calibration (None without one)
>>> scorer.batch(["a.png", "b.jpg"])        # several at once (batched through the model)
>>> for item in scorer.score_paths(paths):  # a stream: Scored, or Skipped for an unreadable file
...     ...

Images reach the model's square input by the checkpoint's resize mode (``squash``, ``letterbox``
or ``tile``; see ``adnb.data.framing``), resized the way training data is (area averaging when
shrinking); the anomaly map is stitched and upsampled bilinearly back to the image's size. With
``squash`` the image score is the model's own (computed at its resolution), so it matches what
evaluation reported; with tiles it is the largest tile score.

``write_scores`` is what ``python -m adnb score`` runs: it streams a folder through the scorer a
batch at a time, appending one CSV row and writing one overlay PNG per image as it goes, so memory
stays flat however many images there are, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adnb.calibration import F1_TEST, Calibration, load_calibration, normalise, read_sidecar
from adnb.data.framing import RESIZE_MODES, check_mode, frame_image, framed_score, stitch
from adnb.data.images import IMAGE_SUFFIXES, ImageReadError, read_image
from adnb.data.layout import find_images
from adnb.methods.base import Detector, load_detector
from adnb.runtime import atomic
from adnb.runtime.device import get_device
from adnb.runtime.errors import AdnbError

ImageLike = str | Path | np.ndarray
CSV_NAME = "scores.csv"
COMMENT = "#"  # scores.csv's first line: the threshold and its false-alarm bound (pandas: comment="#")
SETTINGS_NAME = "scores.json"  # what a run was made with, so a resumed run cannot mix two models


@dataclass
class Scored:
    """One scored image: raw score, map at the image's own resolution, and the calibrated verdict."""

    score: float
    map: np.ndarray  # H×W float32 at the input image's resolution
    source: str = ""
    normalised: float | None = None  # threshold ↦ 0.5 (None without a calibration)
    anomalous: bool | None = None  # score ≥ threshold (None without a calibration or threshold)
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB image, kept only when asked


@dataclass(frozen=True)
class Skipped:
    """A file that could not be read as an image, and why."""

    source: str
    reason: str


def _as_array(image: ImageLike) -> tuple[np.ndarray, str]:
    if isinstance(image, (str, Path)):
        return read_image(image), str(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise AdnbError(f"expected an H×W×3 (or grey H×W) image array, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[:, :, :3]), "<array>"


def _read(path: Path) -> tuple[np.ndarray, str] | Skipped:
    try:
        return read_image(path), str(path)
    except ImageReadError as error:
        return Skipped(str(path), error.reason)


def checkpoint_resize(checkpoint: str | Path) -> str:
    """The resize mode a checkpoint was trained with: its sidecar's ``resize`` (top level, ``info``,
    the config, or the calibration), else ``squash`` (every checkpoint before resize modes existed)."""
    sidecar = read_sidecar(checkpoint)
    for where in (sidecar, sidecar.get("info", {}), sidecar.get("spec", {}).get("config", {}),
                  sidecar.get("calibration") or {}):
        if isinstance(where, dict) and where.get("resize"):
            return check_mode(str(where["resize"]))
    return "squash"


class Scorer:
    """A trained detector wrapped for images of any size, with its calibration when it has one.

    ``threshold``: ``None`` for the calibration's default (from held-out normal images only),
    ``"f1-test"`` for the test set's F1-optimal one (optimistic: see ``adnb.calibration``), or a raw
    score. The normalised score maps the threshold in use to 0.5, so ``normalised ≥ 0.5`` and
    ``anomalous`` always agree.
    """

    def __init__(self, detector: Detector, calibration: Calibration | None = None, *, resize: str = "squash",
                 threshold: float | str | None = None):
        self.detector = detector.eval()
        self.resize = check_mode(resize)
        if threshold == F1_TEST:
            if calibration is None:
                raise AdnbError("--threshold f1-test needs a calibrated checkpoint; this one has none (retrain it)")
            calibration = calibration.f1_test()
        elif calibration is not None and threshold is not None:
            calibration = calibration.with_threshold(float(threshold))
        self.calibration = calibration
        self.threshold = calibration.threshold if calibration else (None if threshold is None else float(threshold))

    def describe_threshold(self) -> str | None:
        """Where the threshold comes from and the false-alarm bound it carries (``None`` without one)."""
        if self.calibration is not None:
            return self.calibration.describe()
        return None if self.threshold is None else f"threshold {self.threshold:.6g} (given by --threshold)"

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto", *, resize: str | None = None,
                        threshold: float | str | None = None) -> Scorer:
        """Load ``weights.pt`` with its calibration; ``resize=None`` uses the mode it was trained with."""
        detector = load_detector(checkpoint, get_device(device))
        return cls(detector, load_calibration(checkpoint), resize=resize or checkpoint_resize(checkpoint),
                   threshold=threshold)

    def _verdict(self, score: float) -> tuple[float | None, bool | None]:
        normalised = normalise(score, self.calibration) if self.calibration is not None else None
        anomalous = bool(score >= self.threshold) if self.threshold is not None else None
        return normalised, anomalous

    @torch.no_grad()
    def _score(self, arrays: Sequence[tuple[np.ndarray, str]], batch_size: int, keep_images: bool) -> list[Scored]:
        """Frame every image, run the model over all windows ``batch_size`` at a time, stitch back."""
        framed = [frame_image(array, self.detector.image_size, self.resize) for array, _ in arrays]
        windows = torch.from_numpy(np.concatenate([tiles for tiles, _ in framed])).permute(0, 3, 1, 2)
        scores, maps = [], []
        for start in range(0, len(windows), max(1, batch_size)):
            x = windows[start:start + batch_size].to(self.detector.device).float().div_(255)
            pred = self.detector.predict(x)
            scores.append(pred.scores.float().cpu())
            maps.append(pred.maps.float().cpu())
        all_scores, all_maps = torch.cat(scores), torch.cat(maps)
        out, row = [], 0
        for (array, source), (_, framing) in zip(arrays, framed):
            k = len(framing)
            score = framed_score(all_scores[row:row + k])
            amap = stitch(all_maps[row:row + k], framing).numpy()
            out.append(Scored(score, amap, source, *self._verdict(score), image=array if keep_images else None))
            row += k
        return out

    def batch(self, images: Sequence[ImageLike], batch_size: int | None = None) -> list[Scored]:
        """Score several images (paths or arrays); an unreadable file raises ``ImageReadError``."""
        arrays = [_as_array(image) for image in images]
        return self._score(arrays, batch_size or max(len(arrays), 1), keep_images=False) if arrays else []

    def __call__(self, image: ImageLike) -> Scored:
        return self.batch([image])[0]

    def score_paths(self, paths: Sequence[Path | str], batch_size: int = 8, *,
                    keep_images: bool = False) -> Iterator[Scored | Skipped]:
        """Stream ``paths`` through the model ``batch_size`` images at a time, in order.

        Yields a ``Scored`` per readable image and a ``Skipped`` per file that is not one (it never
        raises for a bad file). The next batch is decoded on two threads while the model runs on
        this one, and only those two batches are ever in memory. ``keep_images`` attaches each
        decoded image to its result (for overlays).
        """
        paths = [Path(p) for p in paths]
        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), max(1, batch_size))]
        pool = ThreadPoolExecutor(max_workers=2)  # decoding releases the GIL

        def submit(index: int) -> list[Future]:
            return [pool.submit(_read, p) for p in chunks[index]] if index < len(chunks) else []

        try:
            ahead = submit(0)
            for index in range(len(chunks)):
                current = [f.result() for f in ahead]
                ahead = submit(index + 1)
                readable = [r for r in current if not isinstance(r, Skipped)]
                scored = iter(self._score(readable, batch_size, keep_images) if readable else [])
                for item in current:
                    yield item if isinstance(item, Skipped) else next(scored)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files found in the given folders (not recursive), and files named directly.

    A folder contributes its files with an image suffix; a file named directly is taken as it is
    (the decoder, not the suffix, decides whether it is an image). A path that does not exist is
    an error, so a typo is caught before anything runs.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += find_images(path)
        elif path.is_file():
            found.append(path)
        else:
            raise AdnbError(f"{path} does not exist; name image files ({', '.join(IMAGE_SUFFIXES)}) or folders of them")
    if not found:
        raise AdnbError(f"no images found in {', '.join(map(str, inputs))}")
    return list({os.path.abspath(p): p for p in reversed(found)}.values())[::-1]  # each file once, first mention kept


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """A distinct overlay file name per path, ``<stem>_overlay.png`` (the folder's name added on a clash)."""
    used: set[str] = set()
    names = []
    for path in paths:
        name = f"{path.stem}_overlay.png"
        if name in used:  # same file name in two folders
            name = f"{path.parent.name}_{path.stem}_overlay.png"
        while name in used:
            name = f"_{name}"
        used.add(name)
        names.append(name)
    return names


def csv_columns(scorer: Scorer, overlays: bool = True) -> list[str]:
    """The columns ``write_scores`` writes for this scorer (see its docstring)."""
    columns = ["image", "score"]
    if scorer.calibration is not None:
        columns.append("normalised")
    if scorer.threshold is not None:
        columns.append("anomalous")
    return columns + (["overlay"] if overlays else [])


@dataclass
class ScoreRun:
    """What ``write_scores`` did: rows written now, rows kept from before, files skipped, time taken."""

    csv: Path
    written: int = 0
    resumed: int = 0
    anomalous: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    colour_scale: tuple[float, float] | None = None

    @property
    def images_per_s(self) -> float:
        return self.written / max(self.seconds, 1e-9)


def _repair_tail(path: Path) -> None:
    """Cut a last line left half-written by a killed run (rows are whole lines, flushed one by one)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def _done_images(path: Path, columns: list[str]) -> set[str]:
    """Absolute paths of the images already in ``path``; an error if its columns differ from ``columns``."""
    _repair_tail(path)
    with open(path, newline="") as fh:
        reader = csv.reader(line for line in fh if not line.startswith(COMMENT))
        header = next(reader, None)
        if header is None:
            return set()
        if header != columns:
            raise AdnbError(f"{path} has the columns {', '.join(header)} but this run writes {', '.join(columns)} "
                            "(another checkpoint, threshold or overlay setting); pass --overwrite to start over, "
                            "or choose another --out")
        return {os.path.abspath(row[0]) for row in reader if row}


def _settings(scorer: Scorer, checkpoint: str | Path | None, columns: list[str]) -> dict[str, Any]:
    return {"checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "method": scorer.detector.method,
            "resize": scorer.resize, "threshold": scorer.threshold,
            "threshold_source": scorer.calibration.source if scorer.calibration else ("user" if scorer.threshold is not None else None),
            "threshold_means": scorer.describe_threshold(),
            "colour_scale": [scorer.calibration.map_low, scorer.calibration.map_high] if scorer.calibration else None,
            "columns": columns}


def _check_resumable(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS_NAME
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    differ = [k for k in ("checkpoint", "resize", "threshold") if before.get(k) != settings[k]]
    if differ:
        what = "; ".join(f"{k} was {before.get(k)!r}, now {settings[k]!r}" for k in differ)
        raise AdnbError(f"{out / CSV_NAME} was written by another run ({what}); pass --overwrite to start over, "
                        "or choose another --out")


def write_scores(scorer: Scorer, paths: Sequence[Path], out: str | Path, *, checkpoint: str | Path | None = None,
                 batch_size: int = 8, overwrite: bool = False, overlays: bool = True,
                 on_skip: Callable[[Skipped], None] | None = None,
                 on_progress: Callable[[int], None] | None = None) -> ScoreRun:
    """Score ``paths`` into ``out/scores.csv`` (+ one ``<stem>_overlay.png`` each), one batch at a time.

    The first line, ``# threshold …``, says where the threshold comes from and, for the default one,
    the false-alarm rate on normal images it guarantees (read the file with ``comment="#"`` in
    pandas). Columns: ``image`` (the path as given), ``score`` (raw), then ``normalised`` (threshold ↦ 0.5)
    with a calibration, ``anomalous`` (1 if ``score ≥ threshold``, else 0) with a calibration or a
    threshold, and ``overlay`` (the PNG's file name in ``out``). Each overlay is written before its
    row and each row is flushed, so a row always has its overlay; an interrupt (Ctrl-C) keeps every
    image already scored and a killed process loses at most the three batches in flight. Images already in the CSV are skipped (a resumed run) unless
    ``overwrite``; a resumed run must use the same checkpoint, resize mode and threshold.
    Overlays use the calibration's fixed colour scale, or each map's own range without one.
    Unreadable files are reported to ``on_skip`` and listed in the result, not written.
    """
    import cv2

    from adnb.plotting import overlay

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    csv_path, columns = out / CSV_NAME, csv_columns(scorer, overlays)
    settings = _settings(scorer, checkpoint, columns)
    run = ScoreRun(csv_path, colour_scale=tuple(settings["colour_scale"]) if settings["colour_scale"] else None)
    resume = csv_path.is_file() and not overwrite
    if resume:
        _check_resumable(out, settings)
    done = _done_images(csv_path, columns) if resume else set()
    names = dict(zip(paths, overlay_names(paths)))
    todo = [p for p in paths if os.path.abspath(p) not in done]
    run.resumed = len(paths) - len(todo)
    atomic.write_text(out / SETTINGS_NAME, json.dumps(settings, indent=2))
    scale = run.colour_scale or (None, None)
    if on_progress and run.resumed:
        on_progress(run.resumed)

    def draw(item: Scored, name: str) -> None:  # on a worker thread: PNG encoding releases the GIL
        picture = overlay(item.image, item.map, vmin=scale[0], vmax=scale[1])
        cv2.imwrite(str(out / name), np.ascontiguousarray(picture[:, :, ::-1]))

    start = time.perf_counter()
    with open(csv_path, "a" if resume else "w", newline="") as fh, ThreadPoolExecutor(max_workers=2) as painters:
        writer = csv.writer(fh)
        if fh.tell() == 0:
            if settings["threshold_means"]:
                fh.write(f"{COMMENT} {settings['threshold_means']}\n")
            writer.writerow(columns)
        pending: deque[tuple[list[Any], Future | None]] = deque()  # rows whose overlay is being drawn, in order

        def flush(keep: int) -> None:
            while len(pending) > keep:
                row, drawing = pending.popleft()
                if drawing is not None:
                    drawing.result()  # the overlay is on disk before its row is
                writer.writerow(row)
                fh.flush()
                run.written += 1
                if on_progress:
                    on_progress(1)

        try:
            for item in scorer.score_paths(todo, batch_size, keep_images=overlays):
                if isinstance(item, Skipped):
                    run.skipped.append(item)
                    if on_skip:
                        on_skip(item)
                    if on_progress:
                        on_progress(1)
                    continue
                row: list[Any] = [item.source, f"{item.score:.6g}"]
                if item.normalised is not None:
                    row.append(f"{item.normalised:.4f}")
                if item.anomalous is not None:
                    row.append(int(item.anomalous))
                    run.anomalous += int(item.anomalous)
                drawing = None
                if overlays:
                    name = names[Path(item.source)]
                    row.append(name)
                    drawing = painters.submit(draw, item, name)
                pending.append((row, drawing))
                flush(keep=2 * batch_size)  # at most two batches of maps wait for their overlays
        finally:  # an interrupt keeps every row already scored: a resumed run starts after it
            flush(keep=0)
    run.seconds = time.perf_counter() - start
    return run


__all__ = ["RESIZE_MODES", "ScoreRun", "Scored", "Scorer", "Skipped", "checkpoint_resize", "collect_images",
           "csv_columns", "overlay_names", "write_scores"]
