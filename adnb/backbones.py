"""Pretrained feature extractors: chosen stages of a timm model, frozen, with their weights' origin.

RealNet reconstructs a backbone's features, D3AD compares them and bins their kNN distances, and
PyramidFlow's pre-trained variant builds its pyramid on them. All three take a ``Backbone`` by
timm name and stage list::

    backbone = Backbone("tf_efficientnet_lite0", stages=(2, 3))   # strides 8 and 16
    backbone.channels, backbone.strides                          # [40, 112], [8, 16]
    source = backbone.load_weights("auto")                         # "imagenet" from the best source, or random
    features = backbone(images)                                    # images in [0, 1]; one tensor per stage

Stage ``i`` is timm's i-th feature level: 0 is the stem's output (stride 2), 1 … 4 the stages at
strides 4 … 32 — ResNets' ``layer1`` … ``layer4`` are stages 1 … 4. Unused later stages and the
classifier are pruned. Normalisation (the model's ImageNet mean and std) happens inside.

The backbone is frozen: no gradients, and evaluation mode that a parent's ``.train()`` cannot
undo, so BatchNorm keeps its ImageNet statistics. ``unfrozen()`` lifts both for fine-tuning (D3AD's
domain adaptation).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TypeVar

import torch
from torch import nn

from adnb.runtime.errors import AdnbError
from adnb.weights import SOURCES, WeightSource, find_imagenet, fix_for_offline, say_offline

C = TypeVar("C")  # a method's config dataclass

# The book's always-available ImageNet backbone (pip weights): lite0 rather than lite2. Measured with the
# feature-kNN reference at the cpu preset (224², stages 2–3): lite2 took about twice the time (embedded dataset,
# four categories: 117 s against 51 s) for a mean I-AUROC / P-AUROC / AUPRO of 0.883 / 0.959 / 0.846 against
# lite0's 0.868 / 0.950 / 0.830, and scored slightly lower on MVTec AD bottle (0.920 against 0.925 AUPRO).
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


def _timm_model(name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise AdnbError(f"unknown backbone {name!r} ({exc}); any timm model name with features works, e.g. "
                        f"{DEFAULT_BACKBONE}, resnet18.tv_in1k, wide_resnet50_2.racm_in1k") from None


class Backbone(nn.Module):
    """Stages ``stages`` of timm model ``name`` as a frozen feature extractor (see the module docstring)."""

    def __init__(self, name: str = DEFAULT_BACKBONE, stages: Sequence[int] = (2, 3)):
        super().__init__()
        model = _timm_model(name)
        levels = len(model.feature_info)
        self.name, self.stages = name, tuple(int(s) for s in stages)
        if not self.stages or list(self.stages) != sorted(set(self.stages)) or not 0 <= self.stages[0] < levels \
                or self.stages[-1] >= levels:
            raise AdnbError(f"backbone stages {list(stages)} are not increasing indices in 0…{levels - 1} of {name}'s "
                            f"feature levels (strides {[f['reduction'] for f in model.feature_info]})")
        # EfficientNets number their blocks through the whole network in the pip weights; keep the
        # per-stage depths before pruning, so those weights can be placed.
        self.stage_depths = [len(stage) for stage in model.blocks] if hasattr(model, "blocks") else None
        self.pretrained_cfg = dict(model.pretrained_cfg)
        self.channels = [int(model.feature_info[s]["num_chs"]) for s in self.stages]
        self.strides = [int(model.feature_info[s]["reduction"]) for s in self.stages]
        model.prune_intermediate_layers(indices=list(self.stages), prune_head=True)
        self.model = model
        mean, std = self.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)), self.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.source = WeightSource("random", "")
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [0, 1] (B×3×H×W) → one feature map per stage, finest first."""
        return self.model.forward_intermediates((images - self.mean) / self.std, indices=list(self.stages),
                                                intermediates_only=True, stop_early=True)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(mode and not self.frozen)

    @contextlib.contextmanager
    def unfrozen(self) -> Iterator[Backbone]:
        """Trainable, in training mode, inside the block; frozen (and in eval mode) again after it."""
        self.frozen = False
        self.requires_grad_(True).train()
        try:
            yield self
        finally:
            self.frozen = True
            self.requires_grad_(False).eval()

    def load_weights(self, weights: str = "auto", batchnorm_from: torch.Tensor | None = None) -> WeightSource:
        """Put ImageNet weights in (``"imagenet"``: required, ``"auto"``: when found) or keep random ones,
        whose BatchNorm statistics are then estimated on ``batchnorm_from`` when given (the normal
        training images; see ``estimate_batchnorm``).

        Returns where they came from (also kept as ``self.source``). ``"imagenet"`` that no source has
        is an error naming the fix; ``"auto"`` falls back to random weights and says so.
        """
        if weights not in SOURCES:
            raise AdnbError(f"unknown backbone weights {weights!r}; valid: {', '.join(SOURCES)}")
        found = None if weights == "random" else find_imagenet(self.name, self.pretrained_cfg, self.stage_depths)
        if found is None:
            if weights == "imagenet":
                raise AdnbError(f"ImageNet weights for {self.name} are not on this machine and the hub is unreachable; "
                                f"{fix_for_offline(self.name)} — or set weights='random'")
            if weights == "auto":
                say_offline(f"ImageNet weights for {self.name}", fix_for_offline(self.name),
                            f"randomly initialised {self.name} weights (features will be much weaker)")
            self.source = WeightSource("random", "")
            if batchnorm_from is not None:
                self.estimate_batchnorm(batchnorm_from)
            return self.source
        own = self.model.state_dict()
        missing = [k for k in own if k not in found.state]
        if missing:
            raise AdnbError(f"the weights from {found.origin} do not fit {self.name}: {len(missing)} tensors missing, "
                            f"e.g. {missing[:3]}")
        self.model.load_state_dict({k: found.state[k] for k in own})
        self.source = WeightSource(found.kind, found.origin)
        return self.source

    @torch.no_grad()
    def estimate_batchnorm(self, images: torch.Tensor, batch_size: int = 32) -> None:
        """Re-estimate every BatchNorm's running mean and variance on ``images`` (a plain average).

        Random weights come with BatchNorm statistics of mean 0 and variance 1, so their channels sit
        on arbitrary scales; with statistics of the normal images each channel is standardised before
        its activation, as in a trained network. Meant for random weights only.
        """
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None
        self.frozen = False
        self.train()
        for batch in images.split(batch_size):  # batch by batch onto the backbone's device
            self(batch.to(self.mean.device))
        self.frozen = True
        self.eval()


def resolve_weights(name: str, weights: str) -> str:
    """``"auto"`` → ``"imagenet"`` when a source has ImageNet weights for ``name``, else ``"random"``
    (saying so); other values are returned as they are. Resolve before building a config: its cache
    key must name the weights that will actually run."""
    if weights not in SOURCES:
        raise AdnbError(f"unknown backbone weights {weights!r}; valid: {', '.join(SOURCES)}")
    if weights != "auto":
        return weights
    return _available(name)


def with_weights_resolved(config: C) -> C:
    """``config`` (a dataclass with ``backbone`` and ``weights`` fields) with its weights resolved
    (``resolve_weights``): what a method's ``resolve`` returns, so its cache key names what runs."""
    return dataclasses.replace(config, weights=resolve_weights(config.backbone, config.weights))


@lru_cache(maxsize=16)  # asked once per process: the message is printed once, the files read once
def _available(name: str) -> str:
    model = _timm_model(name)
    depths = [len(stage) for stage in model.blocks] if hasattr(model, "blocks") else None
    if find_imagenet(name, dict(model.pretrained_cfg), depths) is not None:
        return "imagenet"
    say_offline(f"ImageNet weights for {name}", fix_for_offline(name),
                f"randomly initialised {name} weights (features will be much weaker)")
    return "random"
