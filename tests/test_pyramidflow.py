"""PyramidFlow's proofs as tests: exact inverses, log-determinants against autograd on the eval path, the
official size."""

from dataclasses import replace

import kornia
import pytest
import torch
import torch.nn.functional as F

from adnb import pyramid
from adnb.methods import load_detector
from adnb.methods.pyramidflow import (
    InvConv1x1,
    PyramidFlow,
    PyramidFlowConfig,
    block_layout,
    conv_nearest_up2,
    fit,
    flips_and_rotations,
    fourier_loss,
    official_choices,
    pair_differences,
    resolve,
    variant,
)
from adnb.runtime.cache import entry
from adnb.runtime.errors import AdnbError

TINY = PyramidFlowConfig(image_size=16, channels=3, levels=3, stacks=1, kernel_size=3)


def randomise(model: PyramidFlow, std: float = 0.05) -> PyramidFlow:
    """Give the zero-initialised convolutions weights, so every coupling does something."""
    torch.manual_seed(1)
    for block in model.blocks:
        torch.nn.init.normal_(block.params.conv2.weight, std=std)
        with torch.no_grad():
            block.mix.log_diag.add_(torch.randn_like(block.mix.log_diag) * 0.3)
    return model


@pytest.mark.parametrize("mode", pyramid.DOWNSAMPLING)
def test_pyramid_round_trip(mode):
    x = torch.randn(2, 16, 64, 64)
    levels = pyramid.build(x, 4, mode)
    assert [tuple(level.shape[-2:]) for level in levels] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert (pyramid.compose(levels) - x).abs().max() < 1e-4
    # the detail levels are not trivially zero: the pyramid is not the identity in disguise
    assert levels[0].abs().mean() > 0.1


def test_blur_is_kornias_binomial_filter_with_zero_padding():
    x = torch.randn(2, 5, 20, 24)
    expected = kornia.filters.filter2d(x, pyramid.binomial_kernel().float()[None], border_type="constant")
    assert torch.allclose(pyramid.blur(x), expected, atol=1e-6)
    assert pyramid.blur(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


def test_down_and_up_definitions():
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(pyramid.down(x, "nearest"), pyramid.blur(x)[:, :, ::2, ::2])
    assert torch.equal(pyramid.down(x, "max"), F.max_pool2d(pyramid.blur(x), 2))
    y = torch.randn(1, 2, 8, 8)
    assert torch.allclose(pyramid.up(y, (16, 16)), pyramid.blur(y.repeat_interleave(2, -1).repeat_interleave(2, -2)))


@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_conv_of_nearest_upsampling_computed_at_low_resolution(k):
    x, w = torch.randn(2, 3, 9, 11, dtype=torch.float64), torch.randn(4, 3, k, k, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=k // 2)
    assert torch.allclose(conv_nearest_up2(x, w), expected, atol=1e-12)


def test_parameter_counts_match_the_official_code():
    assert PyramidFlow(PyramidFlowConfig()).n_params() == 1_413_424  # C = 16, L = 4
    assert PyramidFlow(PyramidFlowConfig(levels=2)).n_params() == 606_384
    assert PyramidFlow(PyramidFlowConfig(levels=8)).n_params() == 3_027_504
    assert sum(p.numel() for p in PyramidFlow(PyramidFlowConfig()).parameters() if not p.requires_grad) == 48


def test_block_layout_is_the_official_stacking():
    assert block_layout(4, 1) == [("dual", 0), ("down", 2), ("up", 0), ("dual", 1)]
    assert len(block_layout(4, 4)) == 16 and len(block_layout(8, 4)) == 32 and len(block_layout(2, 4)) == 8


@pytest.mark.parametrize("volume_norm", ["cvn", "svn"])
def test_whole_flow_round_trip(volume_norm):
    model = randomise(PyramidFlow(replace(PyramidFlowConfig(image_size=64), volume_norm=volume_norm)))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model.train()(x)  # non-zero running means
        model.eval()
        latents = model(x)
        assert (model.inverse(latents) - x).abs().max() < 1e-4
        assert (latents[0] - model.features(x)).abs().mean() > 1e-2  # the flow did transform


def _jacobian_log_det(block, levels):
    shapes = [z.shape for z in levels]
    sizes = [z.numel() for z in levels]

    def f(flat):
        parts = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes)]
        return torch.cat([z.flatten() for z in block(parts)])

    jac = torch.autograd.functional.jacobian(f, torch.cat([z.flatten() for z in levels]), vectorize=True)
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("volume_norm", ["cvn", "svn", "none"])
def test_log_det_on_the_eval_path_against_autograd(volume_norm):
    """At test time volume normalisation subtracts the *running* means, so no block keeps volume by
    construction: each image's log|det J| is Σ (s − running mean). Checked against the log-determinant
    of the full Jacobian (autograd), block by block, per image. Once the running means have settled
    on a batch they are that batch's means, so over that batch the log-determinants sum to zero
    (CVN: per pixel over batch and channels; SVN: per channel over batch and positions) while single
    images' do not; before they settle, they do not sum to zero either. Without VN nothing balances."""
    model = randomise(PyramidFlow(replace(TINY, image_size=8, volume_norm=volume_norm, stacks=2))).double()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert {b.kind for b in model.blocks} == {"dual", "down", "up"}
    with torch.no_grad():
        unsettled = model.eval().log_dets(x)  # running means still 0
        model.train()
        for _ in range(300):  # momentum 0.1: 0.9^300 ≈ 2e-14 of the start is left
            model(x)
        analytic = model.eval().log_dets(x)  # (images, blocks)
    for b in range(2):
        levels = pyramid.build(model.features(x[b:b + 1]), 3)
        for j, block in enumerate(model.blocks):
            numeric = float(_jacobian_log_det(block, levels))
            assert abs(numeric - float(analytic[b, j])) < 1e-8 * max(1.0, abs(numeric))
            levels = [z.detach() for z in block(levels)]
    for block in model.blocks:  # the 1×1 convolution keeps volume exactly under VN, in any mode
        numeric = float(torch.linalg.slogdet(block.mix.matrix().detach().double())[1])
        if volume_norm == "none":
            assert abs(numeric - float(block.mix.log_det(1).detach())) < 1e-8 and abs(numeric) > 1e-3
        else:
            assert abs(numeric) < 1e-10
    if volume_norm == "none":
        assert (analytic.abs() > 1e-2).all()  # without volume normalisation every block changes volume
        torch.testing.assert_close(analytic, unsettled)  # and nothing depends on running statistics
    else:
        assert analytic.abs().max() > 1e-2  # single images: not zero
        assert analytic.sum(0).abs().max() < 1e-9  # over the batch the running means saw: zero
        assert unsettled.sum(0).abs().max() > 1e-2  # with running means that have not seen it: not zero


def test_down_block_normalises_the_scales_it_applies():
    """Under SVN the official order (normalise, then subsample) leaves log|det| ≠ 0; ours gives 0."""
    model = randomise(PyramidFlow(replace(TINY, image_size=8, volume_norm="svn"))).double().train()
    down = next(b for b in model.blocks if b.kind == "down")
    levels = pyramid.build(torch.randn(1, 3, 8, 8, dtype=torch.float64), 3)
    assert abs(float(_jacobian_log_det(down, levels))) < 1e-9


def test_invertible_1x1_convolution():
    conv = InvConv1x1(6)
    with torch.no_grad():
        conv.log_diag.add_(torch.randn(6))
        conv.upper.add_(torch.randn(6, 6) * 0.1)
    assert abs(torch.linalg.det(conv.matrix().double()) ** 2 - 1) < 1e-5
    y = torch.randn(2, 6, 5, 5)
    assert torch.allclose(conv.inverse(conv(y)), y, atol=1e-5)
    free = InvConv1x1(6, volume_norm=False)
    with torch.no_grad():
        free.log_diag.add_(1.0)
    assert torch.isclose(free.log_det(1), torch.linalg.slogdet(free.matrix())[1], atol=1e-5)


def test_losses():
    delta = torch.full((1, 8, 8), 0.5)
    assert torch.isclose(fourier_loss(delta), torch.tensor(0.5 * 64 / 64))  # only the DC term, 0.5·HW / HW
    z = [torch.arange(3.0).view(3, 1, 1, 1)]
    assert pair_differences(z)[0].flatten().tolist() == [1.0, 4.0, 1.0]  # pairs (0,1), (0,2), (1,2)


def test_flips_and_rotations_keep_the_pixels():
    x = torch.rand(4, 3, 8, 8)
    y = flips_and_rotations(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not torch.equal(x, y)


def test_single_template_scores_its_own_image_zero():
    model = randomise(PyramidFlow(replace(TINY, template="single")))
    x = torch.rand(3, 3, 16, 16)
    model.fit_template(x)
    pred = model.predict(x)
    assert pred.maps.shape == (3, 16, 16)
    assert pred.maps[0].abs().max() < 1e-5 and pred.scores[1] > 1e-3


def test_official_choices():
    assert official_choices("carpet") == {"levels": 8, "volume_norm": "svn", "augment": True}
    assert official_choices("screw") == {"levels": 2, "volume_norm": "cvn", "augment": False}
    assert official_choices("bottle") == {"levels": 4, "volume_norm": "svn", "augment": False}


def test_bad_configurations_fail_clearly():
    with pytest.raises(AdnbError, match="divisible"):
        PyramidFlow(replace(TINY, image_size=20, levels=4))
    with pytest.raises(AdnbError, match="volume_norm"):
        PyramidFlow(replace(TINY, volume_norm="bn"))


def test_tiny_fit_lowers_the_loss_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = torch.rand(1, 3, 16, 16)
    images = (base + 0.2 * torch.rand(8, 3, 16, 16)).clamp(0, 1)
    config = replace(TINY, epochs=6, lr=3e-3, volume_norm="svn", augment=True)
    cache = entry("pyramidflow", config, "tiny", root=tmp_path)
    model = fit(config, images, cache=cache)
    losses = [h["loss"] for h in model.fit_info["history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert model.checkpoint is not None and model.train_seconds > 0
    loaded = load_detector(model.checkpoint)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(loaded.predict(x).maps, model.predict(x).maps, atol=1e-6)
    again = fit(config, images, cache=cache)  # from the cache: no training
    assert again.train_seconds == model.train_seconds


def test_training_never_reads_the_template():
    """What lets the chapter's "without latent template" ablation reuse the full model's flow."""
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = replace(TINY, epochs=2, volume_norm="svn")
    mean, single = fit(config, images), fit(replace(config, template="single"), images)
    flow = {k: v for k, v in mean.state_dict().items() if not k.startswith("template")}
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in flow.items())
    assert not torch.equal(mean.template0, single.template0)
    single.fit_template(images)  # the variant as the chapter builds it: the first image's latent
    with torch.no_grad():
        assert torch.equal(single.template0, single(images[:1])[0][0])


def test_pretrained_variant_builds_its_pyramid_on_frozen_encoder_features():
    params = {"image_size": 64, "levels": 0, "volume_norm": "auto", "encoder": "tf_efficientnet_lite0",
              "weights": "random", "stacks": 1, "kernel_size": 3}
    config = resolve(params)
    assert (config.levels, config.volume_norm, config.weights) == (4, "cvn", "random")
    assert variant(config) == "pretrained"
    model = PyramidFlow(config)
    assert (model.channels, model.feature_size) == (24, 16)  # lite0 stage 1: 24 channels at stride 4
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model.train()
    assert not model.encoder.training  # frozen: BatchNorm keeps its statistics
    x = torch.rand(2, 3, 64, 64)
    assert [tuple(z.shape) for z in model(x)] == [(2, 24, 16 >> k, 16 >> k) for k in range(4)]
    model.fit_template(x)
    assert model.predict(x).maps.shape == (2, 64, 64)  # upsampled to the image size
    with pytest.raises(AdnbError, match="feature side 16"):
        PyramidFlow(replace(config, levels=8))
    with pytest.raises(AdnbError, match="not invertible"):
        model.unlift(model.features(x))
    scratch = resolve({**params, "encoder": "none", "weights": "auto"})
    assert scratch.weights == "none" and variant(scratch) == ""


@pytest.mark.parametrize("preset", ["ci", "cpu"])
def test_the_chapters_pretrained_variant_is_the_command_lines(preset):
    """The chapter trains ``recipe.with_params(**pretrained_variant)``; ``python -m adnb train pyramidflow
    -p KEY VALUE …`` with the same pairs must resolve the same config and config hash."""
    from adnb.methods.base import Prepared
    from adnb.recipe import Recipe

    chapter = Recipe.from_preset("pyramidflow", preset, device="cpu")
    p = chapter.params
    assert p["pretrained_variant"]["encoder"] and p["encoder"] == "none"
    in_chapter = chapter.with_params(**p["pretrained_variant"])
    command_line = Recipe.from_preset("pyramidflow", preset, dict(p["pretrained_variant"]), device="cpu")
    a, b = in_chapter.config(), command_line.config()
    assert a == b and a.encoder == p["pretrained_variant"]["encoder"] and a.weights in ("imagenet", "random")
    assert in_chapter.config_hash(a, Prepared()) == command_line.config_hash(b, Prepared())
    assert in_chapter.config_hash(a, Prepared()) != chapter.config_hash(chapter.config(), Prepared())
