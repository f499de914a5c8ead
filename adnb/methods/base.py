"""What every method is: a ``Detector`` that turns images into image scores and anomaly maps.

A method module (``adnb.methods.fair`` …) provides

- a frozen ``Config`` dataclass (with at least ``image_size``),
- a ``Detector`` subclass built from that config, whose ``predict`` maps a batch of images in
  [0, 1] at ``config.image_size`` to ``Prediction(scores, maps)``,
- ``fit(config, images, *, device, cache, force_train) -> Detector``,
- and declares them, with its other hooks, in one ``MethodSpec`` (``adnb.methods.registry``).

Everything a trained detector needs lives in its ``state_dict`` (tensors only), so a checkpoint is
``weights.pt`` plus a JSON sidecar naming the method and its config; ``load_detector`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import nn

from adnb.runtime.cache import CacheEntry
from adnb.runtime.errors import AdnbError
from adnb.runtime.seed import seeded

T = TypeVar("T")
D = TypeVar("D", bound="Detector")


class Prediction(NamedTuple):
    scores: torch.Tensor  # (B,) one anomaly score per image
    maps: torch.Tensor  # (B, H, W) anomaly map at the model's resolution


@dataclass
class Prepared:
    """What a method's optional ``prepare`` hook makes for its ``fit`` (see ``adnb.recipe``): keyword
    arguments, a key naming them (it joins the cache key and the config hash), facts for the record,
    and the cache entries the preparation lives in (``train-all`` ships them to the workers that need
    them). Asked to plan only, ``prepare`` fills in ``key`` and ``entries`` and makes nothing."""

    extras: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    entries: list[CacheEntry] = field(default_factory=list)


class Detector(nn.Module):
    """Base class of every trained model in the book."""

    method: ClassVar[str] = ""
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()))
        return tensor.device

    @property
    def precision(self) -> str:
        """The arithmetic of the method's networks on the current device: ``config.precision`` (fp32 when
        the method has none) with ``auto`` resolved (``adnb.runtime.precision``)."""
        from adnb.runtime.precision import resolve_precision

        return resolve_precision(getattr(self.config, "precision", "fp32"), self.device)

    def predict(self, images: torch.Tensor) -> Prediction:
        """Scores and maps for ``images`` (B×3×S×S, float in [0, 1], S = ``image_size``)."""
        raise NotImplementedError

    def n_params(self) -> int:
        """Number of parameters (trainable and frozen) the detector holds."""
        return sum(p.numel() for p in self.parameters())

    # Set by ``store``/``restore``: how the detector was trained and where its weights lie.
    train_seconds: float = 0.0
    checkpoint: Path | None = None
    fit_info: dict[str, Any]

    @property
    def train_precision(self) -> str:
        """The arithmetic the detector was trained at (its ``fit`` records it), which may differ from
        ``precision`` where a model trained on one machine is loaded on another (``precision: auto``)."""
        return str(getattr(self, "fit_info", {}).get("precision") or self.precision)

    @classmethod
    def from_cache(cls: type[D], config: Any, cache: CacheEntry | None, force_train: bool = False) -> D | None:
        """The detector of ``config`` with its trained weights when ``cache`` holds them, else None (then
        ``fit`` trains); ``force_train`` deletes the entry instead."""
        if cache is not None and force_train:
            cache.clear()
        if cache is None or not cache.exists():
            return None
        with seeded(getattr(config, "seed", 0)):  # the random initial weights are overwritten; the caller's state is kept
            detector = cls(config)
        detector.restore(cache)
        return detector

    def restore(self, cache: CacheEntry | None, force_train: bool = False) -> bool:
        """Load trained weights from ``cache`` if present; ``force_train`` deletes them instead.

        Returns True when the detector is ready (nothing to train).
        """
        if cache is None:
            return False
        if force_train:
            cache.clear()
            return False
        if not cache.exists():
            return False
        state, sidecar = cache.load()
        self.load_state(state)
        self.fit_info = sidecar.get("info", {})
        self.train_seconds = float(self.fit_info.get("train_seconds", 0.0))
        self.checkpoint = cache.weights_path
        print(f"loaded trained {self.method} weights from {cache.folder} "
              f"(trained in {self.train_seconds:.0f} s; force_train=True retrains)")
        return True

    def store(self, cache: CacheEntry | None, train_seconds: float, **info: Any) -> Detector:
        """Record the training time and facts (e.g. ``weights={"backbone": "imagenet"}``) and save."""
        self.train_seconds = float(train_seconds)
        self.fit_info = {"train_seconds": self.train_seconds, **info}
        if cache is not None:
            self.checkpoint = cache.save(self.state_dict(), {"info": self.fit_info})
        return self

    @property
    def weights(self) -> dict[str, str]:
        """Where each pretrained part's weights came from (``{}`` when all was trained here)."""
        return dict(getattr(self, "fit_info", {}).get("weights", {}))

    def load_state(self, state: dict[str, torch.Tensor]) -> Detector:
        """Load ``state``, resizing buffers whose size depends on the training data (templates, banks)."""
        for name, buffer in list(self.named_buffers()):
            if name in state and state[name].shape != buffer.shape:
                owner, _, attr = name.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                module.register_buffer(attr, torch.empty_like(state[name], device=buffer.device))
        self.load_state_dict(state)
        return self


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def detector_class(method: str) -> type[Detector]:
    """The detector class of ``method`` (its module imported on first use; see ``adnb.methods.registry``)."""
    from adnb.methods.registry import spec

    return spec(method).detector


def config_from(config_class: type[T], params: Mapping[str, Any], **changes: Any) -> T:
    """``config_class`` with every field that ``params`` names set from it (lists become tuples), then ``changes``.

    Names that are not fields (a chapter's other parameters) are ignored.
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in fields}
    return config_class(**{**values, **changes})


def build_detector(method: str, config: dict[str, Any] | Any) -> Detector:
    cls = detector_class(method)
    return cls(config_from(cls.config_class, config) if isinstance(config, dict) else config)


def load_detector(checkpoint: str | Path, device: str | torch.device = "cpu") -> Detector:
    """Rebuild a trained detector from ``weights.pt`` (its ``weights.json`` sidecar lies beside it)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "weights.pt"
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise AdnbError(f"no checkpoint at {path} (with its sidecar {sidecar.name}); the results record's "
                        "'checkpoint' field gives the path of a trained model")
    spec = json.loads(sidecar.read_text())["spec"]
    detector = build_detector(spec["method"], spec["config"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    return detector.load_state(state).to(device).eval()
