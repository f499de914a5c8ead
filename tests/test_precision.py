"""Precision: the choice per device, the autocast helpers, and the blocks that must stay fp32 under bf16."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from adnb import pyramid
from adnb.frequency import high_frequency
from adnb.methods import fair
from adnb.methods import pyramidflow as pf
from adnb.runtime import precision
from adnb.runtime.errors import AdnbError

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


def emulation_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, precision.EmulatedPrecisionWarning)]


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "avx512f"}, "fp32"), ({"avx512f", "avx512_bf16"}, "bf16"),
                                                 ({"amx_tile", "amx_bf16"}, "bf16")])
def test_auto_takes_bf16_only_on_cpus_that_have_it(monkeypatch, flags, expected):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "_warned", set())
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.resolve_precision("bf16", "cpu") == "bf16"  # an explicit choice is honoured, even emulated
    assert len(emulation_warnings(caught)) == (expected == "fp32")  # ... and then said


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer for a GPU without bf16")
def test_a_gpu_without_bf16_gets_fp16_and_refuses_bf16():
    assert precision.resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(AdnbError, match="no bf16"):
        precision.resolve_precision("bf16", "cuda")


def test_emulated_precisions_warn_once_with_the_cost_and_the_fix(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # a CPU without 16-bit arithmetic
    monkeypatch.setattr(precision, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.resolve_precision("auto", "cpu") == "fp32"  # auto never picks an emulated precision
        assert emulation_warnings(caught) == []
        for _ in range(3):
            assert fair.FAIR(fair.FairConfig(image_size=32, width=4, precision="bf16")).precision == "bf16"
        assert precision.resolve_precision("fp16", "cpu") == "fp16"
    messages = emulation_warnings(caught)
    assert [m.split(" on ")[0] for m in messages] == ["precision bf16", "precision fp16"]  # one each
    assert all("× slower training" in m and "precision auto" in m for m in messages)


def test_native_precisions_do_not_warn(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_fp16"}))
    monkeypatch.setattr(precision, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for choice in ("auto", "fp32", "bf16", "fp16"):
            precision.resolve_precision(choice, "cpu")
        precision.resolve_precision("bf16", "meta")  # not a CPU: its own rules
    assert emulation_warnings(caught) == []


def test_unknown_precisions_are_refused():
    with pytest.raises(AdnbError, match="unknown precision"):
        precision.resolve_precision("fp8", "cpu")
    with pytest.raises(AdnbError, match="resolve"):
        precision.autocast("auto", "cpu")
    with pytest.raises(AdnbError, match="unknown precision"):
        fair.FAIR(fair.FairConfig(image_size=32, width=4, precision="half"))


def test_autocast_and_its_fp32_islands():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with precision.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    with precision.autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
        with precision.full_precision("cpu"):
            assert (a @ b).dtype == torch.float32
    assert precision.at_least_fp32(a.bfloat16()).dtype == torch.float32
    assert precision.at_least_fp32(a.double()).dtype == torch.float64


def test_the_grad_scaler_is_for_fp16_only_and_the_step_clips():
    assert not precision.grad_scaler("bf16", "cpu").is_enabled()
    assert precision.grad_scaler("fp16", "cpu").is_enabled()
    weight = torch.nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD([weight], lr=1.0)
    precision.optimiser_step((weight - 100).square().sum(), sgd, precision.grad_scaler("fp32", "cpu"),
                             clip=0.5, parameters=[weight])
    assert weight.detach().norm().item() == pytest.approx(0.5, rel=1e-5)  # the gradient was clipped to norm 0.5


@pytest.mark.parametrize("kind", ["bhpf", "sobel_xy3"])
def test_fairs_high_pass_stays_fp32_under_bf16(kind):
    images = smooth_images(2, 32)
    with BF16:
        inside = high_frequency(images, kind)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, high_frequency(images, kind))  # not a bf16 result cast back: bitwise the fp32 one


def test_fair_runs_its_unet_in_bf16_and_returns_fp32():
    images = smooth_images(2, 32)
    fp32 = fair.FAIR(fair.FairConfig(image_size=32, width=4)).eval()
    bf16 = fair.FAIR(fair.FairConfig(image_size=32, width=4, precision="bf16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        reference, mixed = fp32(images), bf16(images)
    assert bf16.precision == "bf16" and mixed.dtype == torch.float32
    assert not torch.equal(mixed, reference)  # the UNet did run in bf16 ...
    torch.testing.assert_close(mixed, reference, atol=0.05, rtol=0.05)  # ... to bf16's accuracy
    prediction = bf16.predict(images)
    assert prediction.maps.dtype == torch.float32 and prediction.scores.dtype == torch.float32

    dtypes = {}
    for name in ("0", "3"):  # the first convolution of the UNet, and the second
        bf16.unet.encoder[0][int(name)].register_forward_hook(lambda m, i, o, name=name: dtypes.update({name: o.dtype}))
    bf16(images)
    assert dtypes == {"0": torch.float32, "3": torch.bfloat16}  # only the first stays fp32 (see RestorationUNet)


def test_the_pyramid_stays_fp32_and_invertible_under_bf16():
    x = torch.randn(2, 16, 32, 32)
    with BF16:
        levels = pyramid.build(x, 4)
        back = pyramid.compose(levels)
    assert all(level.dtype == torch.float32 for level in levels) and back.dtype == torch.float32
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)  # bf16 blurs would miss by ~1e-2


def test_pyramidflow_latents_and_log_determinants_stay_fp32_under_bf16():
    config = pf.PyramidFlowConfig(image_size=32, levels=3, stacks=1, volume_norm="svn")
    torch.manual_seed(0)
    model = pf.PyramidFlow(config)
    for block in model.blocks:  # leave the identity start, so s ≠ 0
        torch.nn.init.normal_(block.params.conv2.weight, std=0.05)
    images = smooth_images(1, 32)
    model.train()  # a batch of one in training mode: volume normalisation makes every log-det exactly 0
    with BF16:
        latents = model(images)
        log_dets = model.log_dets(images)
    assert all(z.dtype == torch.float32 for z in latents) and log_dets.dtype == torch.float32
    assert log_dets.abs().max() < 1e-3
    with BF16:
        loss = pf.training_loss(model(smooth_images(2, 32, 1)), config)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
