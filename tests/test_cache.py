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
