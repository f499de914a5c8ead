"""RealNet: AFS, RRS, the networks' sizes, SIA's opacity ranges, foreground masks, SDAS and its class
conditioning, the pooled image score against a hand computation, and a save → load round trip.

Every backbone here is EfficientNet-Lite0 (timm's ``tf_`` variant) with random weights: no test
touches the network or needs a weight file."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from adnb.diffusion.sdas import SDAS, SDASConfig, fit_sdas, sdas_images
from adnb.methods import load_detector
from adnb.methods.realnet import (Discriminator, RealNet, RealNetConfig, RealNetOutput, ReconUNet,
                                  afs_channel_losses, afs_select, fit, normalised_difference, resolve, rrs_select,
                                  synthesize)
from adnb.runtime.cache import entry
from adnb.runtime.errors import AdnbError
from adnb.synthesis import TextureSource
from adnb.synthesis.foreground import foreground_masks, foreground_rule

# lite0 stages 2 and 3: 40 channels at stride 8, 112 at stride 16 (8² and 4² features at 64²)
TINY = RealNetConfig(image_size=64, backbone="tf_efficientnet_lite0", stages=(2, 3), weights="random", planes=(16, 32),
                     afs_batches=1, afs_batch_size=4, recon_ratio=0.25, recon_mult=(1, 2), recon_blocks=1,
                     recon_attention=(2,), rrs_numbers=(8, 8), source="perlin", epochs=3, batch_size=4, lr=1e-3,
                     score_pool=4)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_afs_prefers_the_channel_that_draws_the_mask():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 8, 8, generator=g) > 0.7).float()
    clean = torch.randn(3, 3, 8, 8, generator=g)
    anomalous = clean.clone()
    anomalous[:, 0] += 2 * masks[:, 0]  # responds exactly inside the mask
    anomalous[:, 1] += torch.randn(3, 8, 8, generator=g)  # responds everywhere
    anomalous[:, 2] += 2 * (1 - masks[:, 0])  # responds everywhere but the mask
    losses = afs_channel_losses(anomalous, clean, torch.nn.functional.interpolate(masks, size=32))
    assert losses[0] < 1e-6 < losses[1] < losses[2]
    assert afs_select(losses, 2).tolist() == [0, 1]
    # min-max normalisation runs over the whole batch, per channel
    d = normalised_difference(anomalous, clean)
    assert torch.allclose(d.amax(dim=(0, 2, 3)), torch.ones(3), atol=1e-3) and d.amin() == 0


def test_afs_select_counts_nan_as_worst_and_sorts():
    losses = torch.tensor([0.5, float("nan"), 0.1, 0.3, 0.2])
    assert afs_select(losses, 3).tolist() == [2, 3, 4]  # NaN becomes the worst finite loss (0.5)


def test_rrs_ranks_on_one_tensor_and_gathers_the_other():
    g = torch.Generator().manual_seed(1)
    residual, ranking = torch.rand(2, 10, 4, 4, generator=g), torch.randn(2, 10, 4, 4, generator=g)
    out = rrs_select(residual, ranking, 3, 2)
    for b in range(2):
        by_max = sorted(range(10), key=lambda c: -float(ranking[b, c].max()))[:3]
        by_mean = sorted(range(10), key=lambda c: -float(ranking[b, c].mean()))[:2]
        assert torch.equal(out[b], residual[b, by_max + by_mean])


def test_network_sizes_match_the_official_model():
    # counted from the official definitions (methods-spec §3.6–3.7): block1 51.9 M, discriminator 5.87 M
    assert abs(n_params(ReconUNet(256, 0.5, (1, 2, 4), 2, (2, 4))) - 51.9e6) < 0.1e6
    assert abs(n_params(Discriminator(512, 2)) - 5.87e6) < 0.01e6


def test_reconstruction_starts_at_zero_and_keeps_the_shape():
    net = ReconUNet(32, 0.5, (1, 2), 1, (2,))
    x = torch.randn(2, 32, 8, 8)
    out = net(x)
    assert out.shape == x.shape and out.abs().max() == 0


def test_foreground_rules():
    image = torch.full((1, 3, 64, 64), 0.1)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disk = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15**2).float()
    image[:, :, disk.bool()] = 0.9
    bright = foreground_masks(image, "otsu_bright")[0, 0]
    assert (bright != disk).float().mean() < 0.02
    assert torch.equal(foreground_masks(image, "otsu_dark")[0, 0], 1 - bright)
    assert foreground_masks(image, "all").min() == 1
    assert foreground_rule("mvtec_ad", "bottle") == "otsu_dark" and foreground_rule("mine", "widget") == "all"
    with pytest.raises(AdnbError):
        foreground_masks(image, "fancy")


def test_config_errors_name_the_problem():
    with pytest.raises(AdnbError, match="planes"):
        RealNet(replace(TINY, planes=(41, 32)))  # lite0 stage 2 has 40 channels
    with pytest.raises(AdnbError, match="one AFS size per stage"):
        RealNet(replace(TINY, planes=(16,)))
    with pytest.raises(AdnbError, match="image_size"):
        RealNet(replace(TINY, image_size=72, recon_mult=(1, 2, 4)))  # stage 2: 9² features, not a multiple of 4


# --- SIA: the opacity of each anomaly source -------------------------------------------------------------------


class ConstantSource:
    """A texture source whose every texture is one colour (so each pixel's opacity can be read off),
    recording whether DRAEM's augmentation was asked for."""

    kind = "constant"

    def __init__(self, colour):
        self.colour, self.augment = torch.tensor(colour), []

    def sample(self, n, *, size=None, generator=None, device=None, augment=True):
        self.augment.append(augment)
        return self.colour.view(1, 3, 1, 1).expand(n, 3, *size).clone()


# the official configs: SDAS images at δ ~ U(0.5, 1), DTD (and procedural) textures at U(0.2, 1), augmented
@pytest.mark.parametrize(("kind", "low", "augmented"), [("sdas", 0.5, False), ("dtd", 0.2, True), ("perlin", 0.2, True)])
def test_sia_blends_each_source_with_its_opacity_range(kind, low, augmented):
    n, size = 300, 16
    image_colour, texture_colour = torch.tensor([0.2, 0.5, 0.1]), [0.9, 0.0, 0.6]
    images = image_colour.view(1, 3, 1, 1).expand(n, 3, size, size).clone()
    source = ConstantSource(texture_colour)
    out, masks = synthesize(images, source, kind, generator=torch.Generator().manual_seed(0))
    assert source.augment == [augmented]
    assert set(masks.unique().tolist()) == {0.0, 1.0} and (masks.flatten(1).amax(1) == 1).all()
    outside = masks.expand_as(out) == 0
    assert torch.equal(out[outside], images[outside])  # I' = I where M = 0
    # where M = 1: I' = I + δ (A − I), so δ = (I' − I) / (A − I), one value per image in every channel and pixel
    delta = (out - images) / (source.colour - image_colour).view(1, 3, 1, 1)
    inside = masks.expand_as(out) == 1
    per_image = torch.stack([delta[i][inside[i]].mean() for i in range(n)])
    for i in range(n):
        assert (delta[i][inside[i]] - per_image[i]).abs().max() < 1e-5
    assert per_image.min() >= low - 1e-5 and per_image.max() <= 1 + 1e-5
    span = 1 - low  # 300 uniform draws reach within 5 % of both ends (each miss has chance 0.95^300 ≈ 2e-7)
    assert per_image.min() < low + 0.05 * span and per_image.max() > 1 - 0.05 * span


def test_sia_keeps_the_masks_inside_the_foreground():
    images = torch.full((20, 3, 16, 16), 0.5)
    foreground = torch.zeros(20, 1, 16, 16)
    foreground[..., 4:12, 4:12] = 1
    out, masks = synthesize(images, ConstantSource([1.0, 1.0, 1.0]), "sdas", foreground=foreground,
                            generator=torch.Generator().manual_seed(1))
    assert masks[foreground == 0].max() == 0 and (masks.flatten(1).amax(1) == 1).all()
    assert torch.equal(out * (1 - foreground), images * (1 - foreground))


# --- the image score: max of the score_pool-averaged softmax map ---------------------------------------------------


def logit(p):
    return math.log(p / (1 - p))


def test_image_score_is_the_max_of_the_pooled_anomaly_probability(monkeypatch):
    """Logits crafted so that softmax(·)[1] is a known map; the score is worked out by hand."""
    detector = RealNet(TINY).eval()  # score_pool = 4
    p = np.full((2, 8, 8), 0.1)
    p[0, 1, 1] = 0.99  # one hot pixel: its best 4×4 window averages (0.99 + 15 · 0.1) / 16 = 0.155625
    p[0, 4:8, 4:8] = 0.7  # a 4×4 blob: the window on it averages 0.7, the score
    p[1, 0:2, 0:2] = 0.9  # two 2×2 patches on a diagonal: the 4×4 window holding both averages
    p[1, 2:4, 2:4] = 0.9  # (8 · 0.9 + 8 · 0.1) / 16 = 0.5, the score
    shift = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # softmax ignores it
    logits = torch.stack([shift, shift + torch.tensor(np.vectorize(logit)(p))], dim=1).float()
    monkeypatch.setattr(detector, "forward", lambda images: RealNetOutput([], [], logits))
    pred = detector.predict(torch.zeros(2, 3, 64, 64))
    np.testing.assert_allclose(pred.maps.numpy(), p, atol=1e-6)
    np.testing.assert_allclose(pred.scores.numpy(), [0.7, 0.5], atol=1e-6)
    # a pooling window wider than the map shrinks to the map: the score is then the mean of the map
    monkeypatch.setattr(detector, "config", replace(TINY, score_pool=16))
    np.testing.assert_allclose(detector.predict(torch.zeros(2, 3, 64, 64)).scores.numpy(),
                               [(0.99 + 16 * 0.7 + 47 * 0.1) / 64, (8 * 0.9 + 56 * 0.1) / 64], atol=1e-6)


# --- the offline backbone weights --------------------------------------------------------------------------------


@pytest.fixture
def empty_weight_caches(monkeypatch, tmp_path):
    """Offline, with empty torch-hub and Hugging Face caches and no $ADNB_WEIGHTS."""
    import huggingface_hub.constants

    from adnb import backbones, weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("ADNB_WEIGHTS", raising=False)
    weights.hub_reachable.cache_clear()
    backbones._available.cache_clear()
    yield
    backbones._available.cache_clear()


def test_resolve_names_the_weights_that_will_run_offline(empty_weight_caches, capsys):
    # lite0's ImageNet weights ship as a pip package; resnet18's are nowhere on this machine
    assert resolve({"backbone": "tf_efficientnet_lite0", "weights": "auto"}).weights == "imagenet"
    assert resolve({"backbone": "resnet18", "stages": (1, 2), "weights": "auto"}).weights == "random"
    out = capsys.readouterr().out
    assert "ImageNet weights for resnet18 not found" in out and "randomly initialised resnet18" in out
    assert resolve({"backbone": "resnet18", "weights": "random"}).weights == "random"
    with pytest.raises(AdnbError, match="unknown backbone weights"):
        resolve({"weights": "pretrained"})


# --- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=g) * 0.2 + 0.4
    cache = entry("realnet", TINY, "test-data", root=tmp_path_factory.mktemp("cache"))
    return fit(TINY, images, source=TextureSource.procedural(64), cache=cache), cache


def test_fit_runs_afs_lowers_the_loss_and_records_its_weights(trained):
    detector, _ = trained
    history = detector.fit_info["history"]
    assert len(history) == TINY.epochs
    assert history[-1]["mse"] < history[0]["mse"]
    assert detector.weights["backbone"] == "random" and detector.weights["anomaly_source"] == "perlin"
    bn = detector.backbone.model.bn1  # its statistics now come from the training images, not N(0, 1)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    kept = detector.index0
    assert len(kept) == 16 and torch.equal(kept, kept.sort().values) and not torch.equal(kept, torch.arange(16))
    assert torch.equal(kept, afs_select(detector.afs_loss0, 16))


def test_predict_gives_probability_maps_at_image_size(trained):
    detector, _ = trained
    pred = detector.predict(torch.rand(2, 3, 64, 64))
    assert pred.maps.shape == (2, 64, 64) and pred.scores.shape == (2,)
    assert 0 <= pred.maps.min() and pred.maps.max() <= 1


def test_checkpoint_round_trip(trained):
    detector, cache = trained
    loaded = load_detector(cache.weights_path)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(x).maps, detector.predict(x).maps)
    assert torch.equal(loaded.index0, detector.index0)
    again = fit(TINY, torch.zeros(1, 3, 64, 64), source=TextureSource.procedural(64), cache=cache)  # from the cache
    assert again.train_seconds == detector.train_seconds


def test_a_last_batch_of_one_image_trains():
    cfg = replace(TINY, epochs=1, afs="random")
    detector = fit(cfg, torch.rand(5, 3, 64, 64), source=TextureSource.procedural(64))
    assert len(detector.fit_info["history"]) == 1 and detector.weights["backbone"] == "random"


# --- SDAS ---------------------------------------------------------------------------------------------------------

SDAS_TINY = SDASConfig(image_size=8, channels=(16, 32), attention=(False, True), layers_per_block=1, head_dim=8,
                       epochs=2, batch_size=4, ema=0.5, sample_steps=4, sample_batch=3)


def test_sdas_trains_samples_and_caches(tmp_path):
    images = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    model = fit_sdas(SDAS_TINY, images, cache=entry("realnet", SDAS_TINY, "x", root=tmp_path, stage="sdas"))
    assert isinstance(model, SDAS) and len(model.history) == 2
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in model.history)
    out = model.sample(2, 1, strength=0.15, variant="ddim", generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and 0 <= out.min() and out.max() <= 1
    cache = entry("realnet", SDAS_TINY, "x", root=tmp_path, stage="sdas-samples")
    first, _ = sdas_images(model, 5, cache=cache)
    assert first.shape == (2, 5, 3, 8, 8) and first.dtype == torch.uint8
    second, _ = sdas_images(model, 5, cache=cache)
    assert torch.equal(first, second)


def test_sdas_output_depends_on_the_class_label():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SDAS(SDAS_TINY, n_classes=2).eval()
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        zero, one = model(x_t, t, torch.tensor([0, 0])), model(x_t, t, torch.tensor([1, 1]))
        mixed = model(x_t, t, torch.tensor([0, 1]))
    assert (zero - one).abs().mean() > 1e-3
    torch.testing.assert_close(mixed, torch.stack([zero[0], one[1]]))  # each sample takes its own label
    # sampling passes the label on: the same noise (same generator state) gives other images for another class
    draw = [model.sample(2, label, generator=torch.Generator().manual_seed(3)) for label in (0, 1, 0)]
    assert torch.equal(draw[0], draw[2]) and (draw[0] - draw[1]).abs().mean() > 1e-3


def test_sdas_images_draws_class_k_with_label_k(monkeypatch):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SDAS(replace(SDAS_TINY, sample_steps=2), n_classes=3).eval()
    calls, real_sample = [], model.sample

    def recording(n, label, **kwargs):
        out = real_sample(n, label, **kwargs)
        calls.append((n, label, kwargs["strength"], out))
        return out

    monkeypatch.setattr(model, "sample", recording)
    images, _ = sdas_images(model, 4)  # sample_batch 3: chunks of 3 and 1 per class
    assert images.shape == (3, 4, 3, 8, 8) and images.dtype == torch.uint8
    assert [(n, label) for n, label, _, _ in calls] == [(3, 0), (1, 0), (3, 1), (1, 1), (3, 2), (1, 2)]
    assert all(0.1 <= s <= 0.2 for _, _, s, _ in calls)  # s ~ U(0.1, 0.2), the default strength range
    for k in range(3):
        drawn = torch.cat([out for _, label, _, out in calls if label == k])
        assert torch.equal(images[k], drawn.mul(255).round().to(torch.uint8))


def test_sdas_learns_what_each_class_looks_like():
    """Two classes, dark and bright. From the same noisy input at t = 800 (little signal left, so only
    the label can tell), the trained model's clean-image estimate is brighter under the bright class's
    label, for every sample. (Untrained, the difference has either sign, about ±0.15; with the two
    classes' images swapped it is about −0.8.)"""
    dark = (torch.full((8, 3, 8, 8), 0.15) + 0.02 * torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    dark = dark.clamp(0, 1)
    cfg = replace(SDAS_TINY, channels=(8, 16), epochs=40, batch_size=8, lr=3e-3, ema=0.0)
    model = fit_sdas(cfg, [dark, 1 - dark])  # class 0 dark, class 1 bright
    t, a = 800, model.schedule.alphas_cumprod[800]
    x_t = (1 - a).sqrt() * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # a mid-grey image noised
    with torch.no_grad():
        estimates = []
        for label in (0, 1):
            eps = model(x_t, torch.full((16,), t), torch.full((16,), label))[:, :3]
            estimates.append(((x_t - (1 - a).sqrt() * eps) / a.sqrt()).mean(dim=(1, 2, 3)))  # x̂_0 in [−1, 1]
    assert (estimates[1] - estimates[0]).min() > 0.2
