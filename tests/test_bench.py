"""`python -m adnb bench`: one JSON line with the documented keys; clear failures. No speed is asserted."""

import json

import cv2
import numpy as np
import pytest
import torch

from adnb import bench
from adnb.cli import main
from adnb.methods import spec
from adnb.recipe import parameters
from adnb.runtime.errors import AdnbError
from adnb.synthesis import TextureSource

KEYS = {"method", "config", "device", "machine", "precision", "precision_applied_by", "image_source", "train_step",
        "batch", "warmup_steps", "steps", "train_s_per_step", "train_s_per_step_min", "train_s_per_step_max",
        "train_images_per_s", "infer_images", "infer_images_per_s_bs1", "infer_images_per_s_bs8", "peak_memory_train_mb",
        "peak_memory_infer_mb", "memory_measure", "setup_seconds", "train_gflop_per_step", "infer_gflop_per_image",
        "peak", "train_peak_fraction", "infer_peak_fraction_bs1", "torch_version"}


def test_the_bench_command_prints_one_json_line(capsys):
    code = main(["bench", "fair", "--size", "32", "--batch", "2", "-p", "width", "4", "--steps", "2", "--warmup", "1", "--infer-images", "8",
                 "--precision", "fp32", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == KEYS
    assert record["config"]["width"] == 4 and record["config"]["image_size"] == 32 and record["batch"] == 2
    assert record["precision"] == record["config"]["precision"] == "fp32" and record["precision_applied_by"] == "config"
    assert record["train_s_per_step_min"] <= record["train_s_per_step"] <= record["train_s_per_step_max"]
    assert record["infer_images_per_s_bs1"] > 0 and record["infer_images_per_s_bs8"] > 0
    assert record["peak_memory_train_mb"] > 0 and record["machine"]["cpu"]
    assert record["machine"]["native_bf16"] in (True, False)
    assert record["train_gflop_per_step"] > 3 * record["infer_gflop_per_image"] > 0  # a batch of 2, forward and backward
    assert 0 < record["train_peak_fraction"] and record["peak"]["peak_gflops"] > 0  # a CPU: its peak is known
    assert "fair at 32²" in err  # the human summary goes to stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_fails_with_one_clear_line(capsys):
    assert main(["bench", "fair", "--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and "CUDA" in err


def test_config_from_defaults_overrides_size_and_batch():
    config = bench.build_config("pyramidflow", {"volume_norm": "svn", "channels": 8, "max_train": 5}, size=64, batch=4)
    assert (config.volume_norm, config.channels, config.image_size, config.batch_size) == ("svn", 8, 64, 4)
    assert bench.build_config("fair", {}, size=None, batch=None).width == 128  # the paper's default


def test_a_parameter_the_chapter_does_not_have_is_refused_not_dropped():
    with pytest.raises(AdnbError, match="unknown parameter.*not_a_field.*valid: .*volume_norm"):
        bench.build_config("pyramidflow", {"volume_norm": "svn", "not_a_field": 1}, size=64, batch=4)


def test_images_synthetic_or_from_a_folder(tmp_path):
    images = bench.synthetic_images(4, 32, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 50, 3), 60 * i, np.uint8))
    loaded = bench.folder_images(tmp_path, 16, n=8)
    assert loaded.shape == (8, 3, 16, 16)
    torch.testing.assert_close(loaded[3], loaded[0])  # three images, repeated to eight
    with pytest.raises(AdnbError, match="no images"):
        bench.folder_images(tmp_path / "empty", 16)


@pytest.mark.parametrize("method", ["fair", "pyramidflow", "d3ad", "realnet"])
def test_every_method_benches_at_its_ci_preset(method):
    result = bench.bench(method, parameters(method, "ci"), steps=1, warmup=0, infer_images=8, precision="bf16",
                         device="cpu")
    assert result.method == method and result.precision == "bf16"
    assert result.train_s_per_step > 0 and result.infer_images_per_s_bs8 > 0
    assert result.train_step == spec(method).training.what  # the step of the method's own training


# Each method at ci with one epoch of exactly one batch (D3AD: two more images, held out for its normalisation).
ONE_BATCH = {"fair": ({"batch_size": 2}, 2), "pyramidflow": ({"batch_size": 2}, 2),
             "d3ad": ({"batch_size": 4, "holdout": 2, "knn_k": 2}, 6), "realnet": ({"batch_size": 4}, 4)}


@pytest.mark.parametrize("method", sorted(ONE_BATCH))
def test_bench_times_the_step_fit_runs(method):
    """The loss ``fit`` records for its one batch is the loss of the step ``bench`` times, built by bench's own
    path, on the same images with the same seed: they diverge if bench ever times a step of its own."""
    changes, n_images = ONE_BATCH[method]
    config = bench.build_config(method, {**parameters(method, "ci"), "epochs": 1, **changes}, size=None, batch=None)
    images = bench.synthetic_images(n_images, config.image_size, torch.Generator().manual_seed(0))
    extras = {"source": TextureSource.from_images(images)} if method == "realnet" else {}  # bench's stand-in for SDAS
    fitted = spec(method).fit(config, images, device="cpu", **extras)
    [epoch] = fitted.fit_info["history"]

    training = bench.start_training(method, config, images, torch.device("cpu"))
    [batch, *rest] = training.batches(0)
    assert not rest, "one batch per epoch"
    terms = training.step(batch)
    assert float(terms["loss"]) == pytest.approx(epoch["loss"], rel=1e-5, abs=1e-7)


def test_a_method_without_a_training_loop_has_no_step_to_time():
    with pytest.raises(AdnbError, match="baseline has no training step to time"):
        bench.bench("baseline", {"image_size": 32}, steps=1, warmup=0, infer_images=8, device="cpu")


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_a_batch_size_for_a_one_pass_method_is_refused_with_the_reason(method):
    with pytest.raises(AdnbError, match=f"{method} has no training step to time"):
        bench.bench(method, {}, batch=2, steps=1, warmup=0, infer_images=8, device="cpu")
