"""FLOP counting and the CPU peak it is compared with (adnb.runtime.flops)."""

import pytest
import torch
import torch.nn.functional as F

from adnb.runtime import flops, precision


def test_flops_of_a_matrix_product_and_a_convolution_by_hand():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert flops.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    x, w = torch.randn(2, 3, 10, 10, requires_grad=True), torch.randn(5, 3, 3, 3, requires_grad=True)
    forward = 2 * (2 * 10 * 10) * 5 * (3 * 3 * 3)  # 2 FLOPs per multiply-add, per output value
    assert flops.count_flops(lambda: F.conv2d(x, w, padding=1)) == forward
    backward = flops.count_flops(lambda: F.conv2d(x, w, padding=1).sum().backward())
    assert backward == 3 * forward  # + the input's and the weight's gradients
    assert flops.count_flops(lambda: torch.relu(x) * 2) == 0  # element-wise work is not counted


@pytest.mark.parametrize(("capability", "flags", "fp32", "bf16"), [
    ("AVX2", {"avx2", "fma"}, 32, 32),  # bf16 emulated: the fp32 units are the limit
    ("AVX512", {"avx512f", "avx512_bf16"}, 64, 128),
    ("AVX512", {"avx512f", "avx512_bf16", "amx_bf16"}, 64, 1024),
    ("DEFAULT", {"sse4_2"}, 8, 8)])
def test_flop_per_cycle_follows_the_kernels_vector_width_and_bf16_units(monkeypatch, capability, flags, fp32, bf16):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(flops, "cpu_flags", lambda: frozenset(flags))
    assert (flops.cpu_flop_per_cycle("fp32"), flops.cpu_flop_per_cycle("bf16")) == (fp32, bf16)


def test_peak_is_cores_times_flop_per_cycle_times_clock(monkeypatch):
    cpuinfo = ("processor\t: 0\ncpu MHz\t\t: 2450.000\nsiblings\t: 4\ncpu cores\t: 2\n"
               "processor\t: 1\ncpu MHz\t\t: 2450.000\n")
    monkeypatch.setattr(flops, "_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(flops.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(flops, "cpu_flop_per_cycle", lambda precision: 32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert flops.physical_cores() == 2  # 4 hyper-threads on 2 cores
    if flops.cpu_clock_ghz()[1] == "/proc/cpuinfo cpu MHz":  # a machine whose /sys states a frequency reads that
        assert flops.peak("cpu", "fp32")["peak_gflops"] == pytest.approx(2 * 32 * 2.45)  # the Zen 3 of issue 23
    assert flops.peak("meta", "fp32") is None
