"""RealNet: AFS, RRS, the networks' sizes, foreground masks, SDAS, and a save → load round trip."""

import pytest
import torch

from adnb.methods import load_detector
from adnb.methods.realnet import (SDAS, Discriminator, RealNet, RealNetConfig, ReconUNet, SDASConfig, afs_channel_losses,
                                  afs_select, fit, fit_sdas, foreground_masks, foreground_rule, normalised_difference,
                                  rrs_select, sdas_images)
from adnb.runtime.cache import entry
from adnb.runtime.errors import AdnbError
from adnb.synthesis import TextureSource

TINY = RealNetConfig(image_size=64, backbone="resnet18", pretrained=False, layers=("layer1", "layer2"), planes=(32, 64),
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
        RealNet(RealNetConfig(image_size=64, backbone="resnet18", pretrained=False, layers=("layer1",), planes=(65,)))
    with pytest.raises(AdnbError, match="image_size"):
        RealNet(RealNetConfig(image_size=72, backbone="resnet18", pretrained=False, layers=("layer1", "layer2"),
                              planes=(8, 8), recon_mult=(1, 2, 4), rrs_numbers=(4, 4)))


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
    bn = detector.backbone.stem[1]  # its statistics now come from the training images, not N(0, 1)
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    kept = detector.index0
    assert len(kept) == 32 and torch.equal(kept, kept.sort().values) and not torch.equal(kept, torch.arange(32))
    assert torch.equal(kept, afs_select(detector.afs_loss0, 32))


def test_predict_scores_the_pooled_map(trained):
    detector, _ = trained
    x = torch.rand(2, 3, 64, 64)
    pred = detector.predict(x)
    assert pred.maps.shape == (2, 64, 64) and 0 <= pred.maps.min() and pred.maps.max() <= 1
    pooled = torch.nn.functional.avg_pool2d(pred.maps[:, None], TINY.score_pool, stride=1)
    torch.testing.assert_close(pred.scores, pooled.flatten(1).amax(1))


def test_checkpoint_round_trip(trained):
    detector, cache = trained
    loaded = load_detector(cache.weights_path)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded.predict(x).maps, detector.predict(x).maps)
    assert torch.equal(loaded.index0, detector.index0)
    again = fit(TINY, torch.zeros(1, 3, 64, 64), source=TextureSource.procedural(64), cache=cache)  # from the cache
    assert again.train_seconds == detector.train_seconds


def test_sdas_trains_samples_and_caches(tmp_path):
    cfg = SDASConfig(image_size=8, channels=(16, 32), attention=(False, True), layers_per_block=1, head_dim=8,
                     epochs=2, batch_size=4, ema=0.5, sample_steps=4, sample_batch=3)
    images = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
    model = fit_sdas(cfg, images, cache=entry("realnet", cfg, "x", root=tmp_path, stage="sdas"))
    assert isinstance(model, SDAS) and len(model.history) == 2
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in model.history)
    out = model.sample(2, 1, strength=0.15, variant="ddim", generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8) and 0 <= out.min() and out.max() <= 1
    cache = entry("realnet", cfg, "x", root=tmp_path, stage="sdas-samples")
    first, _ = sdas_images(model, 5, cache=cache)
    assert first.shape == (2, 5, 3, 8, 8) and first.dtype == torch.uint8
    second, _ = sdas_images(model, 5, cache=cache)
    assert torch.equal(first, second)


def test_a_last_batch_of_one_image_trains():
    cfg = RealNetConfig(**{**TINY.__dict__, "epochs": 1, "afs": "random"})
    detector = fit(cfg, torch.rand(5, 3, 64, 64), source=TextureSource.procedural(64))
    assert len(detector.fit_info["history"]) == 1 and detector.weights["backbone"] == "random"
