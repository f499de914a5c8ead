"""Pretrained weights, with an explicit offline path.

Every pretrained part of the book goes through here, so the rule is the same everywhere: use the
real weights when they are on disk or can be fetched; otherwise say so in one clear message,
carry on with the documented fallback, and report which one ran (``"imagenet"`` or ``"random"``
in the results record). Nothing waits on a network that is not there: torchvision's servers fail
fast when unreachable, and the Hugging Face hub is probed once (3 s) before any hub call.

Manual fix for an offline machine: put the weight file where the message says (for torchvision
backbones ``~/.cache/torch/hub/checkpoints/``; for hub models the usual ``~/.cache/huggingface``),
or set ``TORCH_HOME`` / ``HF_HOME`` to a folder that holds them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch
import torchvision
from torch import nn

T = TypeVar("T")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=4)
def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers (False at once under ``HF_HUB_OFFLINE=1``)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _say_offline(what: str, where: str, fallback: str) -> None:
    print(f"[adnb] {what} not found on this machine and cannot be downloaded (offline). "
          f"Falling back to {fallback}; the results record says so. To use the real weights, {where}, then re-run.")


def torchvision_model(name: str, pretrained: bool = True) -> tuple[nn.Module, str]:
    """A torchvision classification model with ImageNet weights when available.

    Returns ``(model, source)`` with ``source`` ``"imagenet"`` or ``"random"``.
    """
    if not pretrained:
        return torchvision.models.get_model(name, weights=None), "random"
    weights = torchvision.models.get_model_weights(name).DEFAULT
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return torchvision.models.get_model(name, weights=weights), "imagenet"
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated file a RuntimeError
        if target.exists() and not isinstance(exc, OSError):
            target.unlink()  # a broken partial download would fail every later run
        _say_offline(f"ImageNet weights for {name}", f"download {weights.url} to {target}",
                     f"randomly initialised {name} weights (features will be much weaker)")
        return torchvision.models.get_model(name, weights=None), "random"


def hub_pretrained(load: Callable[..., T], repo_id: str, what: str, fallback: str, **kwargs: object) -> T | None:
    """``load(repo_id, **kwargs)`` from the local hub cache or, when reachable, the hub; else None.

    ``load`` is a ``from_pretrained``-style callable (e.g. ``diffusers.AutoencoderKL.from_pretrained``).
    """
    try:
        return load(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError):
        pass
    if hub_reachable():
        return load(repo_id, **kwargs)
    _say_offline(what, f"run `huggingface-cli download {repo_id}` on a connected machine and copy ~/.cache/huggingface "
                       "here", fallback)
    return None


class ResNetFeatures(nn.Module):
    """The feature maps of a torchvision ResNet at chosen stages (``layer1`` … ``layer4``).

    Input: images in [0, 1]; ImageNet normalisation happens inside. Output: one tensor per
    requested layer, in the order given.
    """

    def __init__(self, name: str = "resnet18", layers: Sequence[str] = ("layer1", "layer2", "layer3"),
                 pretrained: bool = True):
        super().__init__()
        model, self.source = torchvision_model(name, pretrained)
        self.layers = tuple(layers)
        last = max(int(layer[-1]) for layer in self.layers)
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        self.stages = nn.ModuleDict({f"layer{i}": getattr(model, f"layer{i}") for i in range(1, last + 1)})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return [_out_channels(self.stages[layer]) for layer in self.layers]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem((images - self.mean) / self.std)
        out = {}
        for name, stage in self.stages.items():
            x = stage(x)
            out[name] = x
        return [out[layer] for layer in self.layers]


def _out_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)
