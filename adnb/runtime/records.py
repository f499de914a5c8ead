"""Results records: one JSON file per notebook run and category (fields fixed by the contract).

Later chapters (the benchmark) and the tests read these files instead of re-running anything.
Each record carries ``config_hash``, a hash of the exact configuration it came from (the method's
resolved config, what ``prepare`` made, the training subset and the evaluation settings), and its
file name carries it too, so two configurations of one method never overwrite each other; a reader
that meets two of them for one method, preset, dataset and category refuses to choose
(``one_per_configuration``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adnb import __version__
from adnb.runtime import atomic, paths
from adnb.runtime.errors import AdnbError

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro")
REQUIRED_KEYS = ("method", "dataset", "category", "preset", "device", "image_size", "metrics", "intervals",
                 "train_seconds", "infer_images_per_s", "n_params", "weights", "checkpoint", "adnb_version",
                 "torch_version", "created", "config_hash")


def make_record(
    *,
    method: str,
    dataset: str,
    category: str,
    preset: str,
    device: str,
    image_size: int,
    metrics: Mapping[str, float | None],
    intervals: Mapping[str, Sequence[float] | None],
    train_seconds: float,
    infer_images_per_s: float,
    n_params: int,
    weights: Mapping[str, str],
    checkpoint: str | Path | None,
    config_hash: str,
    **extra: Any,
) -> dict[str, Any]:
    """Build a record; ``extra`` keys (peak memory, evaluation resolution, notes…) ride along.

    ``intervals`` holds each metric's 95 % interval ``[low, high]``, ``None`` where the metric is.
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}; give None where the data has no masks")
    unmatched = [k for k in METRIC_KEYS if (metrics[k] is None) != (intervals.get(k) is None)]
    if unmatched:
        raise ValueError(f"intervals of {unmatched} do not match the metrics: an interval exactly where a metric is")
    return {
        "method": method, "dataset": dataset, "category": category, "preset": preset, "device": device,
        "image_size": int(image_size),
        "metrics": {k: (None if metrics[k] is None else float(metrics[k])) for k in METRIC_KEYS},
        "intervals": {k: (None if intervals[k] is None else [float(v) for v in intervals[k]]) for k in METRIC_KEYS},
        "train_seconds": float(train_seconds), "infer_images_per_s": float(infer_images_per_s),
        "n_params": int(n_params), "weights": dict(weights),
        "checkpoint": None if checkpoint is None else str(checkpoint), "config_hash": str(config_hash),
        "adnb_version": __version__, "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }


def series(record: Mapping[str, Any]) -> str:
    """The method and its variant (``pyramidflow-pretrained``): one row of a comparison."""
    return record["method"] + (f"-{record['variant']}" if record.get("variant") else "")


def record_path(record: Mapping[str, Any], root: Path | None = None) -> Path:
    root = Path(root) if root else paths.results_dir()
    name = f"{series(record)}-{record['config_hash'][:12]}"
    return root / record["preset"] / record["dataset"] / record["category"] / f"{name}.json"


def write_record(record: Mapping[str, Any], root: Path | None = None) -> Path:
    """Write ``record`` and return its path (also logged for the runner, which prints it)."""
    path = record_path(record, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(record, indent=2))  # a reader (the benchmark) never meets half a record
    log = os.environ.get("ADNB_RECORD_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{path}\n")
    return path


def load_records(root: Path | None = None, *, preset: str | None = None, dataset: str | None = None,
                 method: str | None = None) -> list[dict[str, Any]]:
    """All records under ``root`` matching the filters, oldest first."""
    root = Path(root) if root else paths.results_dir()
    records = [{**json.loads(p.read_text()), "path": str(p)} for p in sorted(root.glob("*/*/*/*.json"))]
    keep = [r for r in records if (preset is None or r["preset"] == preset) and (dataset is None or r["dataset"] == dataset)
            and (method is None or r["method"] == method)]
    return sorted(keep, key=lambda r: r["created"])


def one_per_configuration(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` unchanged if each (method and variant, preset, dataset, category) has one configuration.

    Two records of one method on one category with different ``config_hash`` come from different
    configurations (a ``-p`` override, an edited preset): a table mixing them would compare
    something nobody ran. That is an error naming both files, not a silent choice.
    """
    seen: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in records:
        key = (series(r), r["preset"], r["dataset"], r["category"])
        other = seen.setdefault(key, r)
        if other.get("config_hash") != r.get("config_hash"):
            raise AdnbError(f"two configurations of {key[0]} on {r['dataset']}/{r['category']} at preset {r['preset']}: "
                            f"{other.get('path')} and {r.get('path')} (config hashes {other.get('config_hash')} and "
                            f"{r.get('config_hash')}); delete the one that should not be compared and re-run")
    return records
