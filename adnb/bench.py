"""``python -m adnb bench``: how fast a method trains and scores on this machine, as one JSON line.

A benchmark, not a test: it times, it never judges. For one method at one configuration it

1. builds the detector from the method's config (its defaults, a preset's values, ``-p``
   overrides) with random weights — speed does not depend on what the weights are;
2. times training steps after warm-up: the step is the method's own (its ``MethodSpec.training``,
   ``adnb.runtime.training``): built as ``fit`` builds it, with everything ``fit`` computes before
   its loop, one loss on a batch and one optimiser update — the very step ``fit`` repeats —, at the
   requested precision;
3. times ``predict`` at batch 1 and 8 on images already decoded in memory (the model's work only),
   ``infer_images`` images at each batch size (64: 64 calls at batch 1, 8 at batch 8);
4. reports the median seconds per step and per batch (the machine is shared: medians resist the
   odd slow run), images per second, and peak memory per phase;
5. counts the step's and a batch-1 prediction's FLOPs (``adnb.runtime.flops``: convolutions and
   matrix products) and, on a CPU, the share of its peak at the step's precision they ran at.

Peak memory is what the device can tell honestly: on CUDA ``torch.cuda.max_memory_allocated``
(tensors only, allocator caches excluded); on a CPU the process's peak resident set size during
the phase (Linux ``VmHWM`` after resetting it), which also counts Python, the libraries and the
allocator's caches — an upper bound on what the model needs.

The images are smooth random colour images, or up to ``MAX_IMAGES`` real ones from a folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adnb.methods.base import Detector, config_from
from adnb.methods.registry import spec
from adnb.runtime.device import get_device
from adnb.runtime.errors import AdnbError
from adnb.runtime.flops import count_flops, peak
from adnb.runtime.precision import autocast, cpu_flags, native_bf16, resolve_precision
from adnb.runtime.timing import Measure
from adnb.runtime.training import Training

INFER_BATCHES = (1, 8)
N_IMAGES = 32  # synthetic images: enough for D3AD's k = 20 nearest neighbours and a batch of 16
MAX_IMAGES = 64
MEMORY_MEASURES = {  # adnb.runtime.timing.Measure's kinds, as the record explains them
    "CUDA allocated": "torch.cuda.max_memory_allocated during the phase (tensors only)",
    "process RSS": "peak resident set size of the process during the phase (VmHWM, reset before it): tensors, "
                   "allocator caches, Python and libraries",
    "process RSS since start": "peak resident set size of the process since it started (this system cannot reset it)"}
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


@dataclasses.dataclass
class BenchResult:
    method: str
    config: dict[str, Any]
    device: str
    machine: dict[str, Any]
    precision: str
    precision_applied_by: str
    image_source: str
    train_step: str
    batch: int
    warmup_steps: int
    steps: int
    train_s_per_step: float
    train_s_per_step_min: float
    train_s_per_step_max: float
    train_images_per_s: float
    infer_images: int
    infer_images_per_s_bs1: float
    infer_images_per_s_bs8: float
    peak_memory_train_mb: float
    peak_memory_infer_mb: float
    memory_measure: str
    setup_seconds: float
    train_gflop_per_step: float  # convolutions and matrix products, forward and backward (adnb.runtime.flops)
    infer_gflop_per_image: float
    peak: dict[str, Any] | None  # the CPU's peak GFLOP/s at this precision and how it was computed; None on a GPU
    train_peak_fraction: float | None  # GFLOP/s of the median step over the peak
    infer_peak_fraction_bs1: float | None
    torch_version: str = torch.__version__

    def json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(", ", ": "))


# --- the images ------------------------------------------------------------------------------

def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` smooth random colour images in [0, 1] (N×3×S×S): noise at 1/8 of the side, upsampled
    bilinearly, plus a little pixel noise — gradients and colours of a plausible size."""
    coarse = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.9 * smooth + 0.1 * torch.rand(n, 3, size, size, generator=generator)).clamp_(0, 1)


def folder_images(folder: str | Path, size: int, n: int = N_IMAGES) -> torch.Tensor:
    """Up to ``MAX_IMAGES`` images of ``folder`` resized to ``size``², repeated to at least ``n``."""
    from adnb.data.images import read_image, resize_image
    from adnb.data.layout import find_images

    paths = find_images(Path(folder).expanduser())[:MAX_IMAGES]
    if not paths:
        raise AdnbError(f"no images found in {folder}; give a folder of image files (or leave --images out)")
    images = torch.stack([torch.from_numpy(resize_image(read_image(p), size)).permute(2, 0, 1) for p in paths])
    images = images.float().div_(255)
    return images.repeat(-(-n // len(images)), 1, 1, 1)[:max(n, len(images))]


# --- the machine -----------------------------------------------------------------------------

def describe_machine(device: torch.device) -> dict[str, Any]:
    """The GPU's name, or the CPU's model, cores, threads and the vector features that matter here."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
                "native_bf16": native_bf16(device), "cuda": torch.version.cuda}
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "flags": [f for f in CPU_FEATURES if f in cpu_flags()],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(device)}


# --- timing ----------------------------------------------------------------------------------

def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls (the device's queue drained after each)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronise(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def build_config(method: str, params: Mapping[str, Any], *, size: int | None, batch: int | None) -> Any:
    """The method's config: its defaults, then ``params`` (resolved as the recipe resolves them, "auto"
    choices made), then ``size`` and ``batch``.

    ``params`` are the method's chapter parameters (a preset's values, ``-p`` overrides): a key the
    chapter does not have is an error naming the valid ones (``adnb.recipe.check_overrides``); of the
    others, those that are not config fields (data subsets, ablations) do not enter a timing."""
    from adnb.recipe import check_overrides

    check_overrides(method, params)
    method_spec = spec(method)
    config = method_spec.resolve(params, None) if method_spec.resolve else config_from(method_spec.config_class, params)
    changes = {"image_size": size, "batch_size": batch}
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def time_training(training: Training, batch: int, *, outer: str, device: torch.device, warmup: int, steps: int,
                  generator: torch.Generator) -> tuple[list[float], Measure]:
    """Seconds of each of ``steps`` training steps after ``warmup`` untimed ones, and the phase's memory.

    A step draws ``batch`` of the training images at random and runs the method's ``step`` under
    ``outer`` precision (fp32 where the method applies its own); the first steps pay for kernel selection.
    """
    def step() -> None:
        idx = torch.randint(training.n_images, (batch,), generator=generator).to(device)
        with autocast(outer, device):
            training.step(idx)

    _timed(step, device, warmup)
    with Measure(device) as memory:
        seconds = _timed(step, device, steps)
    return seconds, memory


def training_factory(method: str) -> Callable[..., Training]:
    """What sets ``method``'s training up; an error naming the reason for a method fitted in one pass."""
    make = spec(method).training
    if make is None:
        raise AdnbError(f"{method} has no training step to time (its fit is one pass over the data); "
                        "bench times methods that train iteratively")
    return make


def start_training(method: str, config: Any, images: torch.Tensor, device: torch.device) -> Training:
    """``method``'s training set up on ``images`` as its ``fit`` sets it up: what ``bench`` times."""
    return training_factory(method)(config, images, device=device)


def time_inference(detector: Detector, images: torch.Tensor, *, outer: str, device: torch.device,
                   infer_images: int) -> tuple[dict[int, float], Measure]:
    """Images per second of ``predict`` at each of ``INFER_BATCHES`` (median call after one warm-up call)."""
    detector.eval()
    throughput = {}
    with Measure(device) as memory, torch.inference_mode(), autocast(outer, device):
        for bs in INFER_BATCHES:
            x = images[:bs]
            _timed(lambda: detector.predict(x), device, 1)
            repeats = max(1, infer_images // bs)  # as many images at each batch size: 64 calls at 1, 8 at 8
            throughput[bs] = bs / statistics.median(_timed(lambda: detector.predict(x), device, repeats))
    return throughput, memory


def step_flops(training: Training, batch: int, *, outer: str, device: torch.device, generator: torch.Generator) -> int:
    """FLOPs of one more training step (after the timed ones: not timed)."""
    idx = torch.randint(training.n_images, (batch,), generator=generator).to(device)
    with autocast(outer, device):
        return count_flops(lambda: training.step(idx))


def peak_fraction(flop_per_s: float, machine_peak: Mapping[str, Any] | None) -> float | None:
    """``flop_per_s`` over the machine's peak (None where the peak is unknown)."""
    return round(flop_per_s / 1e9 / machine_peak["peak_gflops"], 4) if machine_peak else None


def bench(method: str, params: Mapping[str, Any] | None = None, *, size: int | None = None, batch: int | None = None,
          steps: int = 5, warmup: int = 2, infer_images: int = 64, precision: str = "auto", device: str = "auto",
          images: str | None = None, seed: int = 0) -> BenchResult:
    """Time ``method``'s training step and inference (see the module docstring)."""
    if steps < 1 or warmup < 0 or infer_images < 1:
        raise AdnbError("steps and inference images must be at least 1, warm-up at least 0")
    make = training_factory(method)  # before the config: a one-pass method has no batch size to set
    dev = get_device(device)
    chosen = resolve_precision(precision, dev)
    config = build_config(method, params or {}, size=size, batch=batch)
    # A method whose config has a precision runs it itself (keeping its own fp32 parts); for one
    # without, the whole step runs under autocast here, and the record says so.
    if "precision" in {f.name for f in dataclasses.fields(config)}:
        config, outer, applied_by = dataclasses.replace(config, precision=chosen), "fp32", "config"
    else:
        outer, applied_by = chosen, "bench (the method has no precision setting: autocast around its whole step)"

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    data = (folder_images(images, config.image_size) if images
            else synthetic_images(N_IMAGES, config.image_size, generator)).to(dev)
    training = make(config, data, device=dev)
    setup = time.perf_counter() - start

    train, train_memory = time_training(training, config.batch_size, outer=outer, device=dev, warmup=warmup,
                                        steps=steps, generator=generator)
    train_flops = step_flops(training, config.batch_size, outer=outer, device=dev, generator=generator)
    training.finish()  # what scoring needs from the training images (a template, a kNN bank): not timed
    throughput, infer_memory = time_inference(training.detector, data, outer=outer, device=dev,
                                              infer_images=infer_images)
    with torch.inference_mode(), autocast(outer, dev):
        infer_flops = count_flops(lambda: training.detector.predict(data[:1]))
    per_step = statistics.median(train)
    machine_peak = peak(dev, chosen)
    return BenchResult(
        method=method, config=dataclasses.asdict(config), device=str(dev), machine=describe_machine(dev),
        precision=chosen, precision_applied_by=applied_by, image_source=images or "synthetic",
        train_step=training.what, batch=config.batch_size, warmup_steps=warmup, steps=steps,
        train_s_per_step=round(per_step, 4), train_s_per_step_min=round(min(train), 4),
        train_s_per_step_max=round(max(train), 4), train_images_per_s=round(config.batch_size / per_step, 3),
        infer_images=infer_images, infer_images_per_s_bs1=round(throughput[1], 3),
        infer_images_per_s_bs8=round(throughput[8], 3), peak_memory_train_mb=round(train_memory.peak_mb, 1),
        peak_memory_infer_mb=round(infer_memory.peak_mb, 1),
        memory_measure=MEMORY_MEASURES.get(train_memory.peak_kind, train_memory.peak_kind),
        setup_seconds=round(setup, 2), train_gflop_per_step=round(train_flops / 1e9, 3),
        infer_gflop_per_image=round(infer_flops / 1e9, 4), peak=machine_peak,
        train_peak_fraction=peak_fraction(train_flops / per_step, machine_peak),
        infer_peak_fraction_bs1=peak_fraction(infer_flops * throughput[1], machine_peak))


def summary(result: BenchResult) -> str:
    """One human line for the terminal."""
    where = result.machine.get("gpu") or f"{result.machine.get('cpu')} ({result.machine.get('threads')} threads, " \
                                         f"{' '.join(result.machine.get('flags', [])) or 'no AVX flags'})"
    return (f"{result.method} at {result.config['image_size']}², batch {result.batch}, {result.precision} on {where}: "
            f"{result.train_s_per_step:.3f} s/step, inference {result.infer_images_per_s_bs1:.1f} / "
            f"{result.infer_images_per_s_bs8:.1f} images/s at batch 1 / 8"
            + (f"; {result.train_peak_fraction:.1%} of the {result.peak['peak_gflops']:.0f} GFLOP/s peak in training"
               if result.train_peak_fraction is not None else ""))
