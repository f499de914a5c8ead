"""The training cache: tensors-only files, resume after an interruption, forced retraining."""

from __future__ import annotations

import pytest
import torch

from adnb.methods import baseline, load_detector
from adnb.runtime import cache
from adnb.runtime.errors import TrainingInterrupted


def tiny_training(entry: cache.CacheEntry | None, stop_at: int | None = None, epochs: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, 2, 0.5)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def run_epoch(epoch: int) -> dict[str, float]:
        if epoch == stop_at:
            raise KeyboardInterrupt
        noise = torch.randn(64) * 0.01  # draws from the RNG, so resuming must restore it
        loss = ((model(x)[:, 0] - y - noise) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
        return {"loss": loss.item()}

    history = cache.train_loop(epochs, run_epoch, {"model": model, "opt": optimiser, "sched": scheduler}, entry)
    return model, history


def test_interrupted_training_resumes_to_the_same_result(tmp_path):
    reference, ref_history = tiny_training(None)
    entry = cache.entry("toy", {"a": 1}, "data", root=tmp_path)
    with pytest.raises(TrainingInterrupted, match="Run the same cell again to resume"):
        tiny_training(entry, stop_at=3)
    assert entry.checkpoint_path.is_file()
    resumed, history = tiny_training(entry)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref_history])
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.allclose(a, b)


def test_checkpoint_and_weights_load_with_weights_only(tmp_path):
    entry = cache.entry("toy", {"a": 1}, "data", root=tmp_path)
    with pytest.raises(TrainingInterrupted):
        tiny_training(entry, stop_at=2)
    assert torch.load(entry.checkpoint_path, weights_only=True)["epoch"] == 2
    entry.save({"w": torch.ones(2)}, {"train_seconds": 1.5})
    state, sidecar = entry.load()
    assert torch.equal(state["w"], torch.ones(2)) and sidecar["train_seconds"] == 1.5
    assert not entry.checkpoint_path.exists()


def test_keys_separate_configs_data_and_stages(tmp_path):
    a = cache.entry("m", {"x": 1}, "d1", root=tmp_path)
    assert a.folder == cache.entry("m", {"x": 1}, "d1", root=tmp_path).folder
    assert len({a.folder, cache.entry("m", {"x": 2}, "d1", root=tmp_path).folder,
                cache.entry("m", {"x": 1}, "d2", root=tmp_path).folder,
                cache.entry("m", {"x": 1}, "d1", root=tmp_path, stage="vae").folder}) == 4


def test_detector_restore_store_and_force_train(tmp_path):
    images = torch.rand(6, 3, 16, 16)
    config = baseline.BaselineConfig(image_size=16, box=1)
    entry = cache.entry("baseline", config, "d", root=tmp_path)
    first = baseline.fit(config, images, cache=entry)
    again = baseline.fit(config, torch.zeros(6, 3, 16, 16), cache=entry)  # loads, ignores the new images
    assert torch.equal(first.mean, again.mean) and again.checkpoint == entry.weights_path
    retrained = baseline.fit(config, torch.zeros(6, 3, 16, 16), cache=entry, force_train=True)
    assert retrained.mean.abs().sum() == 0
    loaded = load_detector(entry.weights_path)
    assert torch.equal(loaded.mean, retrained.mean)
    scores, maps = loaded.predict(images)
    assert scores.shape == (6,) and maps.shape == (6, 16, 16)


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path

import torch

from adnb.runtime import cache

entry = cache.entry("toy", {"a": 1}, "data", root=Path(sys.argv[1]))
# The sidecar's bytes are in its temporary file, not yet renamed into place: the process dies here.
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
entry.save({"w": torch.full((3,), float(sys.argv[2]))}, {"info": {"run": sys.argv[2]}})
"""


def test_a_write_killed_halfway_leaves_no_complete_looking_entry(tmp_path):
    import json
    import signal
    import subprocess
    import sys

    entry = cache.entry("toy", {"a": 1}, "data", root=tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), "1"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert entry.weights_path.is_file() and not entry.sidecar_path.exists()
    assert not entry.exists()  # the weights alone are not an entry: the next run trains again
    entry.save({"w": torch.zeros(3)}, {"info": {"run": "0"}})
    assert entry.exists() and json.loads(entry.sidecar_path.read_text())["info"] == {"run": "0"}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), "2"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    # a rewrite killed halfway: the old sidecar went first, so new weights never pass for the old entry
    assert not entry.exists() and not entry.sidecar_path.exists()


def test_atomic_writes_leave_no_temporary_file_after_an_error(tmp_path):
    from adnb.runtime import atomic

    target = tmp_path / "marker.json"
    atomic.write_text(target, "old")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_atomically(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["marker.json"]
