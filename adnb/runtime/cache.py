"""The training cache: trained weights keyed by configuration, with resumable checkpoints.

An entry is a folder ``<cache>/<method>/<key>/`` where ``key`` hashes the method, its
configuration and a fingerprint of the training images. It holds

- ``weights.pt``   — the trained model: tensors only, loadable with ``torch.load(weights_only=True)``;
- ``weights.json`` — the sidecar: method, configuration, versions, training time. Written last and
  atomically (``adnb.runtime.atomic``), it marks the entry complete: a killed write leaves no entry;
- ``checkpoint.pt`` — while training: the last finished epoch (model, optimiser, RNG), so an
  interrupted run resumes instead of starting over.

A re-run with the same configuration loads ``weights.pt`` instead of retraining;
``force_train=True`` deletes the entry first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from adnb import __version__
from adnb.runtime import atomic, paths
from adnb.runtime.errors import TrainingInterrupted
from adnb.runtime.progress import progress

CACHE_FORMAT = 2  # 2: ImageNet backbones, explicit generators, FAIR_noDTD augmenters


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def config_key(spec: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able mapping (dataclasses are turned into dicts)."""
    text = json.dumps(_jsonable(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file and rename, so an interrupt never leaves half a file."""
    atomic.replace_atomically(path, lambda tmp: torch.save(obj, tmp))


class CacheEntry:
    """One trained model's folder in the cache (see the module docstring)."""

    def __init__(self, folder: Path, spec: Mapping[str, Any]):
        self.folder = Path(folder)
        self.spec = _jsonable(spec)
        self.stages: list[CacheEntry] = []  # the entries ``stage`` handed out (train-all ships them with this one)

    def stage(self, name: str, config: Any) -> CacheEntry:
        """The entry of another trained part of the same method on the same data (e.g. D3AD's
        autoencoder), keyed by ``config`` (the options that part depends on), in the same cache."""
        part = entry(self.spec["method"], config, self.spec["data"], root=self.folder.parent.parent, stage=name)
        self.stages.append(part)
        return part

    @property
    def weights_path(self) -> Path:
        return self.folder / "weights.pt"

    @property
    def sidecar_path(self) -> Path:
        return self.folder / "weights.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def exists(self) -> bool:
        return self.weights_path.is_file() and self.sidecar_path.is_file()

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def save(self, state: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
        """Store the final weights and the sidecar; drop the resume checkpoint.

        The sidecar marks the entry complete: an old one is removed first and the new one written last,
        each file atomically, so a process killed at any point leaves no entry that looks complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sidecar_path.unlink(missing_ok=True)
        _atomic_save({k: v.detach().cpu() for k, v in state.items()}, self.weights_path)
        sidecar = {"spec": self.spec, **_jsonable(dict(info)), "adnb_version": __version__,
                   "torch_version": torch.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic.write_text(self.sidecar_path, json.dumps(sidecar, indent=2))  # last: it marks the entry complete
        self.checkpoint_path.unlink(missing_ok=True)
        return self.weights_path

    def load(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state = torch.load(self.weights_path, map_location=map_location, weights_only=True)
        return state, json.loads(self.sidecar_path.read_text())

    def save_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(dict(checkpoint), self.checkpoint_path)

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location=map_location, weights_only=True)


def entry(method: str, config: Any, data_fingerprint: str, root: Path | str | None = None,
          stage: str = "model") -> CacheEntry:
    """The cache entry for ``method`` trained with ``config`` on the data of ``data_fingerprint``.

    ``stage`` separates several trained parts of one method (e.g. D3AD's autoencoder and its
    denoiser), each cached and resumed on its own.
    """
    spec = {"format": CACHE_FORMAT, "method": method, "stage": stage, "config": config, "data": data_fingerprint}
    root = Path(root) if root else paths.cache_dir()
    return CacheEntry(root / method / f"{stage}-{config_key(spec)}", spec)


class GeneratorState:
    """Lets ``train_loop`` checkpoint a ``torch.Generator``, so a resumed run draws the same batches."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


def train_loop(
    epochs: int,
    run_epoch: Callable[[int], Mapping[str, float]],
    state: Mapping[str, Stateful],
    checkpoint: CacheEntry | None = None,
    desc: str = "training",
) -> list[dict[str, float]]:
    """Run ``run_epoch(epoch)`` for ``epochs`` epochs, checkpointing after each one.

    ``state`` names everything that must survive an interruption (models, optimisers,
    schedulers, and the training's ``torch.Generator`` wrapped in ``GeneratorState``). If
    ``checkpoint`` holds a half-finished run, training resumes after its last epoch with the same
    random state. Returns one dict of logged values per epoch.
    """
    start, history = 0, []
    saved = checkpoint.load_checkpoint() if checkpoint else None
    if saved is not None:
        for name, obj in state.items():
            obj.load_state_dict(saved["state"][name])
        torch.set_rng_state(saved["rng"])
        start, history = int(saved["epoch"]), list(saved["history"])
        print(f"{desc}: resuming from the checkpoint after epoch {start}/{epochs}")
    bar = progress(range(start, epochs), total=epochs, initial=start, desc=desc)
    epoch = start
    try:
        for epoch in bar:
            logs = {k: float(v) for k, v in run_epoch(epoch).items()}
            history.append(logs)
            bar.set_postfix(logs)
            if checkpoint is not None:
                checkpoint.save_checkpoint({"epoch": epoch + 1, "history": history, "rng": torch.get_rng_state(),
                                            "state": {k: v.state_dict() for k, v in state.items()}})
    except KeyboardInterrupt:
        where = f"the checkpoint {checkpoint.checkpoint_path} keeps epoch {len(history)}" if checkpoint else "no checkpoint was kept (no cache)"
        raise TrainingInterrupted(f"{desc} was interrupted during epoch {epoch + 1}/{epochs}; {where}. "
                                  "Run the same cell again to resume.") from None
    return history


def cached_training(entry: CacheEntry | None, module: torch.nn.Module, train: Callable[[CacheEntry | None], Mapping[str, Any] | None],
                    force_train: bool = False) -> dict[str, Any]:
    """Load ``module``'s trained weights from ``entry``, or run ``train(entry)`` and store them there.

    ``train`` trains ``module`` in place (checkpointing into the entry it is given, to resume) and
    returns facts to keep (a loss history, say). Returns those facts with ``train_seconds``: the
    stored ones when loaded, so a reloaded part reports how long it once took to train.
    """
    if entry is not None and force_train:
        entry.clear()
    if entry is not None and entry.exists():
        state, sidecar = entry.load()
        module.load_state_dict(state)
        return dict(sidecar["info"])
    start = time.perf_counter()
    info = {**(train(entry) or {})}
    info = {"train_seconds": time.perf_counter() - start, **info}
    if entry is not None:
        entry.save(module.state_dict(), {"info": info})
    return info
