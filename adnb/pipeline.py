"""A method's whole recipe without Jupyter: preset → config → fit (cached) → evaluate → record.

What ``python -m adnb train`` runs. The preset's notebook parameters are matched by name to the
method's ``Config`` fields and to the extra keyword arguments of its ``fit`` (such as a texture
folder), so a chapter and the command line train the same model from the same preset.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adnb.data.layout import Category
from adnb.evaluation import Evaluation, evaluate, result_record
from adnb.methods.base import Detector, detector_class
from adnb.runtime import cache
from adnb.runtime.errors import AdnbError
from adnb.runtime.records import write_record
from adnb.runtime.timing import Measure

STANDARD_FIT_ARGS = {"config", "images", "device", "cache", "force_train"}


def method_module(method: str) -> Any:
    detector_class(method)  # a clear error for an unknown name
    return importlib.import_module(f"adnb.methods.{method}")


def config_for(method: str, params: Mapping[str, Any]) -> Any:
    """The method's Config with every field that ``params`` names set from it."""
    config_class = detector_class(method).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in fields})


def fit_extras(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the method's ``fit`` beyond the standard ones, taken from ``params``."""
    signature = inspect.signature(method_module(method).fit)
    return {name: params[name] for name in signature.parameters if name not in STANDARD_FIT_ARGS and name in params}


def train_category(method: str, params: Mapping[str, Any], category: Category, *, device: Any,
                   force_train: bool = False) -> tuple[Detector, float]:
    """Fit (or load from the cache) ``method`` on ``category``; returns the detector and peak memory (MB)."""
    module, config, extras = method_module(method), config_for(method, params), fit_extras(method, params)
    limit = int(params.get("max_train") or 0) or None
    train = category.load("train", config.image_size, limit=limit)
    with Measure(device) as measured:
        if method == "realnet":
            config, extras = _realnet_inputs(config, params, category, limit, device=device, force_train=force_train)
        entry = cache.entry(method, config, category.fingerprint())
        detector = module.fit(config, train.float_images(), device=device, cache=entry, force_train=force_train,
                              **extras)
    return detector, measured.peak_mb


SDAS_PARAMS = {"sdas_size": "image_size", "sdas_channels": "channels", "sdas_attention": "attention",
               "sdas_layers": "layers_per_block", "sdas_epochs": "epochs", "sdas_batch": "batch_size",
               "sdas_lr": "lr", "sdas_ema": "ema", "sdas_steps": "sample_steps", "seed": "seed"}


def _realnet_inputs(config: Any, params: Mapping[str, Any], category: Category, limit: int | None, *,
                    device: Any, force_train: bool) -> tuple[Any, dict[str, Any]]:
    """RealNet's foreground rule and SIA anomaly source for one category, as its chapter builds them.

    The chapter trains one class-conditional SDAS model over all categories; here it is trained on
    this category alone (cached under the same key the chapter uses for a one-category run).
    """
    from adnb.methods import realnet
    from adnb.synthesis import TextureSource

    config = dataclasses.replace(config, foreground=realnet.foreground_rule(category.dataset, category.name))
    if config.source == "perlin":
        return config, {"source": TextureSource.procedural(config.image_size)}
    if config.source == "dtd":
        if not params.get("dtd_root"):
            raise AdnbError("RealNet with source 'dtd' needs a texture folder: add -p dtd_root DTD/images")
        return config, {"source": TextureSource.from_folder(params["dtd_root"], config.image_size)}
    sdas_config = realnet.SDASConfig(**{field: tuple(params[key]) if isinstance(params[key], list) else params[key]
                                        for key, field in SDAS_PARAMS.items() if key in params})
    key = f"{category.name}:{category.fingerprint()}"
    images = category.load("train", sdas_config.image_size, limit=limit).images
    sdas_cache = cache.entry("realnet", sdas_config, key, stage="sdas")
    sdas = realnet.fit_sdas(sdas_config, [images], device=device, cache=sdas_cache, force_train=force_train)
    per_class = int(params.get("sdas_per_class", 24))
    samples = cache.entry("realnet", {"sdas": sdas_config, "per_class": per_class}, key, stage="sdas-samples")
    sdas_set, _ = realnet.sdas_images(sdas, per_class, cache=samples, force=force_train)
    return config, {"source": TextureSource.from_images(sdas_set[0])}


def evaluate_and_record(detector: Detector, category: Category, params: Mapping[str, Any], preset: str,
                        **extra: Any) -> tuple[Evaluation | None, Path | None]:
    """Evaluate on the test set (when it has both kinds of images) and write the results record."""
    labels = {s.label for s in category.test}
    if labels != {0, 1}:
        return None, None
    result = evaluate(detector, category, resolution=str(params.get("eval_resolution") or "model"),
                      limit=int(params.get("max_test") or 0) or None, seed=int(params.get("seed") or 0))
    return result, write_record(result_record(detector, category, result, preset=preset, **extra))
