"""One recipe per method: resolve → prepare → fit (cached) → evaluate → record.

A chapter's "every category" loop, ``python -m adnb train`` and ``train-all`` all run a method
through ``Recipe``, so one method at one preset trains the same model, under the same cache key,
and writes a record with the same ``config_hash`` whichever of them ran it::

    recipe = Recipe.from_preset("fair", "cpu", {"epochs": 40})   # or Recipe("fair", params) in a chapter
    trained = recipe.run(category)                                # config → fit → evaluate → record
    trained.detector, trained.evaluation.metrics, trained.record

Each method declares the steps that are its own in its ``MethodSpec`` (``adnb.methods.registry``);
the recipe calls them for every method alike and knows no method by name:

- ``resolve(params, category) -> Config`` (optional): the config for one category, the "auto"
  choices included (PyramidFlow's official per-category settings, D3AD's latent space, a
  backbone's weights). Without it, the params' values are matched to the config's fields by name.
  ``precision: auto`` stays ``auto``: each machine resolves it where the model runs, so a model
  trained at bf16 on a GPU node and the same model asked for by a CPU driver share one cache key
  (the record states the precision training and evaluation ran at).
- ``prepare(config, params, category, *, device, force_train, plan) -> Prepared`` (optional): what
  ``fit`` needs beyond the images (RealNet's SIA anomaly source), with a key that joins the cache
  key and the config hash, and the cache entries it lives in. With ``plan=True`` it makes nothing
  and returns only the key and the entries: what ``train-all`` plans with, on the driver.
- ``fit(config, images, *, device, cache, force_train, **prepared.extras) -> Detector``.
- ``variant(config) -> str`` (optional): a name for a configuration that is its own row in a
  comparison (PyramidFlow's ``"pretrained"``).

``params`` are a chapter's parameters: its notebook's defaults, then the preset's values, then
overrides (``parameters``). Besides the config fields they hold the recipe's own settings:
``max_train``, ``max_test``, ``eval_resolution``, ``resize``, ``calibration_holdout`` and ``seed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adnb.data.layout import Category, Split, split_holdout, stratified_subset
from adnb.evaluation import Evaluation, evaluate, result_record
from adnb.methods.base import Detector, Prepared, config_from, detector_class
from adnb.methods.registry import MethodSpec, spec
from adnb.runtime import cache
from adnb.runtime.device import get_device
from adnb.runtime.records import write_record
from adnb.runtime.timing import Measure

DEFAULT_HOLDOUT = 0.1  # share of train/good kept out of training to calibrate the scores (at most MAX_HOLDOUT images)
MAX_HOLDOUT = 20
VARIANT_SUFFIX = "_variant"  # a parameter named so holds one named variant's changed parameters (see Recipe.variants)


@dataclass
class Trained:
    """One method trained on one category, and what became of it."""

    method: str
    category: Category
    config: Any
    detector: Detector
    config_hash: str
    prepared: Prepared
    peak_mb: float
    entry: cache.CacheEntry  # where the detector's weights are (its stages, if any, in entry.stages)
    holdout: Split | None = None
    evaluation: Evaluation | None = None
    record: Path | None = None

    @property
    def variant(self) -> str:
        hook = spec(self.method).variant
        return hook(self.config) if hook else ""


def chapter_of(method: str) -> str:
    """The chapter whose notebook and presets hold ``method``'s parameters (an unknown method is named
    as such, not as a missing chapter)."""
    return spec(method).chapter_name


def parameters(method: str, preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``method``'s parameters as its chapter runs at ``preset``: notebook defaults ⊕ preset ⊕ overrides.

    An override the chapter does not have (a typo such as ``wdith``), or of the wrong type, is an
    error naming the valid keys, as ``python -m adnb run`` reports it: every command goes through here.
    """
    from adnb.runtime.presets import load_preset
    from adnb.runtime.runner import notebook_defaults

    check_overrides(method, overrides or {})
    chapter = chapter_of(method)
    return {**notebook_defaults(chapter), **load_preset(preset, chapter), **(overrides or {})}


def parameter_names(method: str) -> list[str]:
    """The keys ``-p`` may set for ``method``: its chapter's parameters."""
    from adnb.runtime.runner import find_notebook, notebook_parameters

    detector_class(method)  # an unknown method is named as such, not as a missing chapter
    return sorted(notebook_parameters(find_notebook(chapter_of(method))))


def check_overrides(method: str, overrides: Mapping[str, Any]) -> None:
    """An error naming the valid keys when ``overrides`` has a key ``method``'s chapter does not, or a value
    of the wrong type (``adnb.runtime.runner.check_parameters``, what ``run`` applies)."""
    from adnb.runtime.runner import check_parameters, find_notebook

    detector_class(method)
    notebook = find_notebook(chapter_of(method))
    check_parameters(notebook, overrides, what=f"{method} (the parameters of {notebook.stem})")


def holdout_count(n_images: int, share: float) -> int:
    """How many of ``n_images`` training images calibrate instead of train: ⌈share·n⌉, 2 … MAX_HOLDOUT."""
    if share <= 0:
        return 0
    return int(min(MAX_HOLDOUT, max(2, round(share * n_images)), n_images // 2))


class Recipe:
    """``method`` at fixed parameters, ready to run on any category (see the module docstring)."""

    def __init__(self, method: str, params: Mapping[str, Any], *, device: str | torch.device = "auto"):
        self.method = method
        self.spec: MethodSpec = spec(method)
        self.params = dict(params)
        self.preset = str(self.params.get("preset") or "custom")
        if not isinstance(device, torch.device):  # an explicit device wins over the params' own
            device = get_device(str(device) if str(device) != "auto" else str(self.params.get("device") or "auto"))
        self.device = device

    @classmethod
    def from_preset(cls, method: str, preset: str, overrides: Mapping[str, Any] | None = None, *,
                    device: str | torch.device = "auto") -> Recipe:
        return cls(method, parameters(method, preset, overrides), device=device)

    def with_params(self, **changes: Any) -> Recipe:
        """The same recipe with some parameters changed (a variant: ``recipe.with_params(encoder=...)``
        trains what ``python -m adnb train … -p encoder …`` trains)."""
        return Recipe(self.method, {**self.params, **changes}, device=self.device)

    def variants(self) -> dict[str, Recipe]:
        """The named variants a chapter trains beside its main model, as recipes: each parameter
        ``<name>_variant`` holds the parameters in which variant ``<name>`` differs (PyramidFlow's
        ``pretrained_variant``). ``train-all`` plans them as jobs of their own, so the book loads them."""
        return {key.removesuffix(VARIANT_SUFFIX): self.with_params(**value)
                for key, value in self.params.items() if key.endswith(VARIANT_SUFFIX) and value}

    # --- the settings of the recipe itself

    def _int(self, key: str) -> int:
        return int(self.params.get(key) or 0)

    @property
    def max_train(self) -> int | None:
        return self._int("max_train") or None

    @property
    def max_test(self) -> int | None:
        return self._int("max_test") or None

    @property
    def seed(self) -> int:
        return self._int("seed")

    @property
    def resize(self) -> str:
        return str(self.params.get("resize") or "squash")

    @property
    def eval_resolution(self) -> str:
        return str(self.params.get("eval_resolution") or "native")

    @property
    def holdout_share(self) -> float:
        value = self.params.get("calibration_holdout")
        return DEFAULT_HOLDOUT if value is None else float(value)

    # --- resolve → prepare → fit → evaluate → record

    def config(self, category: Category | None = None, **changes: Any) -> Any:
        """The method's config for ``category`` (the "auto" choices resolved), with ``changes`` applied."""
        resolve = self.spec.resolve
        config = resolve(self.params, category) if resolve else config_from(self.spec.config_class, self.params)
        # ``precision: auto`` is kept as it is (see the module docstring): the detector resolves it on its device
        return dataclasses.replace(config, **changes) if changes else config

    def prepare(self, config: Any, category: Category, *, force_train: bool = False, plan: bool = False) -> Prepared:
        """The method's ``prepare`` (nothing when it has none); ``plan``: its key and entries, nothing made."""
        hook = self.spec.prepare
        if hook is None:
            return Prepared()
        return hook(config, self.params, category, device=self.device, force_train=force_train, plan=plan)

    def training_data(self, config: Any, category: Category) -> tuple[Split, Split | None]:
        """(training images, held-out normal images for calibration) at the config's image size."""
        split = category.load("train", config.image_size, limit=self.max_train, seed=self.seed, resize=self.resize)
        n_images = int(split.origin.max()) + 1 if len(split) else 0
        keep, held = split_holdout(n_images, holdout_count(n_images, self.holdout_share), self.seed)
        if not len(held):
            return split, None
        return _rows_of(split, keep), _rows_of(split, held)

    def n_train(self, category: Category) -> int:
        """How many of ``category``'s images ``training_data`` trains on, counted from the file list (no image
        is read: planning asks this of every job)."""
        n_images = len(stratified_subset(category.train, self.max_train, self.seed))
        return n_images - holdout_count(n_images, self.holdout_share)

    def config_hash(self, config: Any, prepared: Prepared) -> str:
        """A hash of everything that makes this record what it is: config, prepared inputs, data subset,
        calibration hold-out and evaluation settings (not the device or the machine)."""
        return cache.config_key({"method": self.method, "config": config, "prepared": prepared.key,
                                 "train": {"max_train": self.max_train, "holdout": self.holdout_share,
                                           "resize": self.resize, "seed": self.seed},
                                 "eval": {"resolution": self.eval_resolution, "max_test": self.max_test}})

    def cache_entry(self, category: Category, *, config: Any = None, prepared: Prepared | None = None
                    ) -> cache.CacheEntry:
        """The cache entry ``train`` loads from or trains into on ``category`` (``train-all`` asks it which
        jobs are done). Without ``prepared`` it asks ``prepare`` to plan only: nothing is trained."""
        config = self.config(category) if config is None else config
        prepared = self.prepare(config, category, plan=True) if prepared is None else prepared
        data_key = "|".join(filter(None, (category.fingerprint(),
                                          f"train={self.n_train(category)}/{self.resize}/{self.seed}", prepared.key)))
        return cache.entry(self.method, config, data_key)

    def is_trained(self, category: Category, *, config: Any = None) -> bool:
        """Whether ``train`` on ``category`` would load cached weights instead of training."""
        return self.cache_entry(category, config=config).exists()

    def train(self, category: Category, *, config: Any = None, prepared: Prepared | None = None,
              force_train: bool = False) -> Trained:
        """Fit (or load from the cache) the method on ``category`` (``prepared``: what ``prepare`` made, if done)."""
        config = self.config(category) if config is None else config
        prepared = self.prepare(config, category, force_train=force_train) if prepared is None else prepared
        train, held = self.training_data(config, category)
        entry = self.cache_entry(category, config=config, prepared=prepared)
        with Measure(self.device) as measured:
            detector = self.spec.fit(config, train.float_images(), device=self.device, cache=entry,
                                     force_train=force_train, **prepared.extras)
        return Trained(self.method, category, config, detector, self.config_hash(config, prepared), prepared,
                       measured.peak_mb, entry, held)

    def evaluate(self, trained: Trained) -> Evaluation | None:
        """Scores on the test set when it has good and anomalous images (else None), then calibration."""
        if {s.label for s in trained.category.test} == {0, 1}:
            trained.evaluation = evaluate(trained.detector, trained.category, resolution=self.eval_resolution,
                                          limit=self.max_test, seed=self.seed, resize=self.resize)
        self.calibrate(trained)
        return trained.evaluation

    def calibrate(self, trained: Trained) -> None:
        """Store score statistics of the held-out normal images (and the test threshold) with the checkpoint."""
        from adnb.calibration import calibrate, save_calibration

        if trained.holdout is None or trained.detector.checkpoint is None:
            return
        calibration = calibrate(trained.detector, trained.holdout, trained.evaluation, resize=self.resize)
        save_calibration(trained.detector.checkpoint, calibration)

    def record(self, trained: Trained, **extra: Any) -> Path | None:
        """Write the results record (when there was an evaluation)."""
        if trained.evaluation is None:
            return None
        info = {"train_precision": trained.detector.train_precision, **trained.prepared.info, **extra}
        if trained.variant:
            info.setdefault("variant", trained.variant)
        record = result_record(trained.detector, trained.category, trained.evaluation, preset=self.preset,
                               config_hash=trained.config_hash, peak_memory_mb=trained.peak_mb,
                               resize=self.resize, **info)
        trained.record = write_record(record)
        return trained.record

    def run(self, category: Category, *, config: Any = None, prepared: Prepared | None = None,
            force_train: bool = False, **extra: Any) -> Trained:
        """``train`` → ``evaluate`` → ``record`` on one category."""
        trained = self.train(category, config=config, prepared=prepared, force_train=force_train)
        self.evaluate(trained)
        self.record(trained, **extra)
        return trained

    def run_all(self, categories: Sequence[Category], *, force_train: bool = False, **extra: Any) -> list[Trained]:
        """``run`` on every category, in order (a chapter's "every category" section)."""
        return [self.run(category, force_train=force_train, **extra) for category in categories]


def _rows_of(split: Split, images: torch.Tensor) -> Split:
    """The rows of ``split`` that belong to the given image indices (every tile of each)."""
    rows = torch.isin(split.origin, images).nonzero().flatten()
    remap = torch.full((int(split.origin.max()) + 1,), -1, dtype=torch.long)
    remap[images] = torch.arange(len(images))
    return Split(split.images[rows], split.labels[rows], None if split.masks is None else split.masks[rows],
                 [split.samples[i] for i in rows.tolist()], split.resize, remap[split.origin[rows]])
