"""D3AD: the noise-level rule, kNN, guided reconstruction, the autoencoders, the offline path for SD's VAE,
the combined map against SciPy, each image's own noise level reaching ``predict``, and a tiny fit → save →
load. No test touches the network: the extractor has random weights, the VAE comes from a local cache."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.neighbors import NearestNeighbors

from adnb.data.layout import split_holdout
from adnb.diffusion import linear_schedule, q_sample
from adnb.methods import load_detector
from adnb.methods import d3ad
from adnb.methods.d3ad import (D3AD, SD_VAE_REPO, AnomalyTerms, D3ADConfig, SmallAutoencoder, StableDiffusionVAE,
                               adaptation_loss, bin_edges, build_unet, cosine_distance_map, fit, guided_eps,
                               knn_distances, noise_level, reconstruct_latent, resolve, resolve_latent, round_to_tens,
                               step_sequence)
from adnb.runtime.cache import entry
from adnb.runtime.errors import AdnbError


def official_noise_level(d, train_distances, t_max=80, min_bin=2):
    """The official rule, written with numpy as the code does it."""
    _, edges = np.histogram(train_distances, 10)
    b = min(int(np.digitize(d, edges, right=True)) - 1, 9) + 1
    x = max(b, min_bin) / 10 * t_max
    return int(np.floor(x / 10 + 0.5) * 10)


def test_noise_level_follows_the_official_binning():
    rng = np.random.default_rng(0)
    train = rng.gamma(4.0, 1.0, 200)
    edges = bin_edges(torch.tensor(train), 10)
    np.testing.assert_allclose(edges.numpy(), np.histogram(train, 10)[1], rtol=1e-12)
    queries = np.concatenate([rng.uniform(train.min() - 1, train.max() + 2, 500), edges.numpy()])
    got = noise_level(torch.tensor(queries), edges, t_max=80, min_bin=2)
    want = [official_noise_level(q, train) for q in queries]
    assert got.tolist() == want
    # the ten bins map to these levels; below the range → the minimum bin, above → T_max
    centres = torch.tensor((edges[:-1] + edges[1:]).numpy() / 2)
    assert noise_level(centres, edges, 80).tolist() == [20, 20, 20, 30, 40, 50, 60, 60, 70, 80]
    assert noise_level(torch.tensor([train.min() - 5, train.max() + 5]), edges, 80).tolist() == [20, 80]


def test_round_to_tens_rounds_ties_up():
    assert round_to_tens(torch.tensor([14.9, 15.0, 16.0, 24.0, 56.0, 64.0])).tolist() == [10, 20, 20, 20, 60, 60]


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_distances_match_sklearn(exclude_self):
    bank = torch.randn(30, 12, generator=torch.Generator().manual_seed(0))
    queries = bank if exclude_self else torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    k = 5
    nn_ = NearestNeighbors(n_neighbors=k + int(exclude_self), metric="l1").fit(bank.numpy())
    dist, _ = nn_.kneighbors(queries.numpy())
    want = dist[:, 1:] if exclude_self else dist
    got = knn_distances(queries, bank, k, exclude_self=exclude_self)
    np.testing.assert_allclose(got.numpy(), want.mean(axis=1), rtol=1e-5)
    if exclude_self:  # counting itself lowers every training distance: the official code's bias
        assert (knn_distances(bank, bank, k) < got).all()


def test_step_sequence_takes_ten_strided_steps_to_the_clean_end():
    pairs = step_sequence(torch.tensor([80, 20, 0]), 10)
    ts = torch.stack([t for t, _ in pairs] + [pairs[-1][1]], dim=1)
    assert ts[0].tolist() == [80, 72, 64, 56, 48, 40, 32, 24, 16, 8, -1]
    assert ts[1].tolist() == [20, 18, 16, 14, 12, 10, 8, 6, 4, 2, -1]
    assert ts[2].tolist() == [0] * 10 + [-1]


def test_guidance_vanishes_at_the_input_trajectory():
    s = linear_schedule()
    z0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([30, 80])
    on_track = q_sample(s, z0, t, eps)
    torch.testing.assert_close(guided_eps(s, on_track, t, eps, z0, w=7.0), eps)
    off_track = on_track + 0.5
    assert not torch.allclose(guided_eps(s, off_track, t, eps, z0, w=7.0), eps)
    torch.testing.assert_close(guided_eps(s, off_track, t, eps, z0, w=0.0), eps)


def test_noiseless_reconstruction_with_a_silent_denoiser_returns_the_input():
    """ε_θ ≡ 0: scaling by √ᾱ and DDIM's x̂_0 = z_t / √ᾱ undo each other exactly, guided or not."""
    s = linear_schedule()
    z0 = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    calls = []

    def silent(z, t):
        calls.append(t.clone())
        return torch.zeros_like(z)

    out = reconstruct_latent(silent, s, z0, torch.tensor([20, 50, 80]), steps=10, guidance=4.0)
    torch.testing.assert_close(out, z0)
    assert len(calls) == 10 and calls[0].tolist() == [20, 50, 80] and calls[-1].tolist() == [2, 5, 8]
    # with ω > 0 the start is noisy and a silent denoiser cannot remove the noise
    noisy = reconstruct_latent(silent, s, z0, torch.tensor([80] * 3), omega=1.0, guidance=0.0,
                               noise=torch.randn_like(z0))
    assert (noisy - z0).abs().mean() > 0.05


def test_cosine_maps_and_adaptation_loss():
    a = torch.randn(2, 8, 4, 4)
    assert cosine_distance_map(a, 3 * a).abs().max() < 1e-6
    torch.testing.assert_close(cosine_distance_map(a, -a), torch.full((2, 1, 4, 4), 2.0))
    assert float(adaptation_loss([a, a], [a, 2 * a])) == pytest.approx(0.0, abs=1e-6)
    assert float(adaptation_loss([a], [torch.randn_like(a)])) > 0.5


def test_small_autoencoder_shapes_and_latent_scale():
    ae = SmallAutoencoder((8, 16))
    x = torch.rand(2, 3, 32, 32)
    z = ae.encode(x)
    round_trip = ae.decode(z)
    assert z.shape == (2, 4, 8, 8) and round_trip.shape == x.shape
    ae.latent_scale.fill_(4.0)
    torch.testing.assert_close(ae.encode(x), 4 * z)
    torch.testing.assert_close(ae.decode(ae.encode(x)), round_trip)  # the scale cancels in a round trip


def test_stable_diffusion_vae_architecture_has_sds_parameter_count():
    vae = StableDiffusionVAE()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's KL-f8 VAE (sd-vae-ft-mse)
    assert not any(p.requires_grad for p in vae.parameters())


def test_config_checks():
    with pytest.raises(AdnbError):
        D3ADConfig(latent="auto")  # resolved before a config is built (resolve / resolve_latent)
    with pytest.raises(AdnbError):
        D3ADConfig(t_max=80, train_t_max=50)
    with pytest.raises(AdnbError):
        D3ADConfig(image_size=102)  # not a multiple of the autoencoder's factor 4
    with pytest.raises(AdnbError, match="knn_stage"):
        D3ADConfig(stages=(1, 3), knn_stage=2)
    with pytest.raises(AdnbError, match="reference"):
        D3ADConfig(reference="decoded")


# --- the offline path for Stable Diffusion's VAE: the local Hugging Face cache, else the small autoencoder ---------


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """Empty Hugging Face and torch-hub caches of our own, no $ADNB_WEIGHTS (offline: conftest sets
    HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    from adnb import backbones, weights

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ADNB_WEIGHTS", raising=False)
    weights.hub_reachable.cache_clear()
    backbones._available.cache_clear()
    d3ad.pretrained_sd_vae.cache_clear()
    yield tmp_path / "hf"
    d3ad.pretrained_sd_vae.cache_clear()
    backbones._available.cache_clear()


def test_without_sd_vae_weights_auto_falls_back_to_the_small_autoencoder(hf_cache, capsys):
    assert d3ad.pretrained_sd_vae() is None
    config = resolve({"latent": "auto", "weights": "random", "image_size": 32})
    assert config.latent == "small" and config.downsampling == 4
    out = capsys.readouterr().out
    assert SD_VAE_REPO in out and "latent='small'" in out  # says what it falls back to, and how to get the weights
    assert resolve({"latent": "sd", "weights": "random"}).latent == "sd"  # an explicit choice is kept …
    # the extractor's weights are resolved too: lite0's ship as a pip package, ResNet-18's are not here
    assert resolve({"backbone": "tf_efficientnet_lite0", "weights": "auto"}).weights == "imagenet"
    assert resolve({"backbone": "resnet18", "weights": "auto"}).weights == "random"
    with pytest.raises(AdnbError, match=SD_VAE_REPO):  # … and training it without the weights says what is missing
        fit(D3ADConfig(image_size=32, latent="sd", unet_channels=(8, 16, 16), unet_head_dim=8, train_t_max=100,
                       backbone="resnet18", weights="random", holdout=0), torch.rand(4, 3, 32, 32))


def test_sd_vae_weights_in_the_local_cache_are_found_offline(hf_cache):
    """A (tiny) VAE saved where the hub cache keeps stabilityai/sd-vae-ft-mse is what ``auto`` finds."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1)
    repo = hf_cache / f"models--{SD_VAE_REPO.replace('/', '--')}"
    vae.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    found = d3ad.pretrained_sd_vae()
    assert found is not None
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), vae.state_dict().values()))
    assert resolve_latent("auto") == "sd" and resolve({"latent": "auto", "weights": "random"}).latent == "sd"


def test_split_holdout():
    train, hold = split_holdout(20, 4, seed=1)
    assert len(hold) == 4 and len(train) == 16 and not set(train.tolist()) & set(hold.tolist())
    assert sorted(train.tolist() + hold.tolist()) == list(range(20))
    train, hold = split_holdout(20, 0)
    assert train.tolist() == list(range(20)) and hold.numel() == 0  # D3AD's fit then calibrates on the training images
    with pytest.raises(AdnbError, match="hold out"):
        split_holdout(4, 4)


# random ResNet-18 weights (BatchNorm statistics estimated on the training images): no weight file, no network
TINY = D3ADConfig(image_size=32, ae_channels=(8, 16), ae_epochs=3, unet_channels=(8, 16, 16), unet_head_dim=8,
                  epochs=4, batch_size=8, lr=1e-3, train_t_max=100, backbone="resnet18", weights="random", knn_k=3,
                  knn_pool=4, da_epochs=1, holdout=2)


def tiny_images(n=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(n, 3, 32, 32)
    return (base + 0.05 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)


def test_tiny_fit_trains_saves_and_reloads(tmp_path):
    images = tiny_images()
    cache = entry("d3ad", TINY, "tiny-data", root=tmp_path)
    det = fit(TINY, images, cache=cache)
    state = det.state_dict()
    assert state["knn_bank"].shape == (12, 128 * 16) and state["bin_edges"].shape == (11,)
    assert state["train_distances"].shape == (12,) and state["map_range"][1] > state["map_range"][0]
    assert set(det.fit_info["stage_seconds"]) == {"autoencoder", "denoiser", "adaptation", "knn_and_normalisation"}
    assert det.weights["latent"] == "trained-here" and det.weights["backbone"].endswith("adapted-1-epochs")

    test = torch.cat([tiny_images(3, seed=5), torch.rand(1, 3, 32, 32)])
    pred = det.predict(test)
    assert pred.scores.shape == (4,) and pred.maps.shape == (4, 32, 32)
    assert pred.scores[3] > pred.scores[:3].max()  # noise is far from a smooth ramp
    one = det.predict(test[:1])  # no image's score depends on the others in its batch
    torch.testing.assert_close(one.scores, pred.scores[:1], rtol=1e-4, atol=1e-5)

    loaded = load_detector(det.checkpoint)
    torch.testing.assert_close(loaded.predict(test).maps, pred.maps)
    assert fit(TINY, images, cache=cache).train_seconds == pytest.approx(det.train_seconds)  # from the cache

    # a changed DA budget reuses the cached autoencoder and denoiser stages
    no_da = fit(dataclasses.replace(TINY, da_epochs=0), images, cache=entry("d3ad", dataclasses.replace(TINY, da_epochs=0),
                                                                               "tiny-data", root=tmp_path))
    torch.testing.assert_close(no_da.denoiser.conv_in.weight, det.denoiser.conv_in.weight)
    assert "adaptation" not in no_da.fit_info["stage_seconds"]

    # variants: static levels, and the official self-including kNN (lower training distances)
    static = det.variant(images[:2], static_t=40)
    assert static.noise_levels(test).tolist() == [40] * 4
    official = det.variant(knn_include_self=True)
    assert (official.train_distances < det.train_distances).all()


def test_unet_is_diffusers_and_takes_per_sample_timesteps():
    unet = build_unet(TINY, 8)
    out = unet(torch.randn(3, 4, 8, 8), torch.tensor([1, 50, 99])).sample
    assert out.shape == (3, 4, 8, 8)
    assert type(unet).__name__ == "UNet2DModel"


def untrained(config=TINY):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return D3AD(config).eval()


# --- the anomaly map: λ · norm(latent) + (1 − λ) · norm(feature), Gaussian blur, score = max ------------------------


def test_combined_map_against_a_hand_computation_and_scipys_gaussian():
    config = dataclasses.replace(TINY, image_size=64)  # σ = 4 · 64/256 = 1 pixel, kernel 9 × 9
    detector = untrained(config)
    g = torch.Generator().manual_seed(0)
    latent, feature = torch.rand(2, 64, 64, generator=g) * 3, torch.rand(2, 64, 64, generator=g) * 0.4
    latent[0, 20:24, 30:34] += 5  # a spot in one term only
    ranges = torch.tensor([0.2, 3.2, 0.05, 0.45])  # latent (min, max), feature (min, max)
    pred = detector.combine(AnomalyTerms(latent, feature, torch.tensor([40, 40]), torch.zeros(2, 3, 64, 64)), ranges)
    lam = 0.85
    mixed = lam * (latent.double().numpy() - 0.2) / 3.0 + (1 - lam) * (feature.double().numpy() - 0.05) / 0.4
    # kornia's default border is torch's "reflect" (d c b | a b c d), which scipy calls "mirror"; radius 4σ
    want = np.stack([ndimage.gaussian_filter(m, sigma=1.0, mode="mirror", truncate=4.0) for m in mixed])
    np.testing.assert_allclose(pred.maps.numpy(), want, atol=2e-6)
    np.testing.assert_allclose(pred.scores.numpy(), want.reshape(2, -1).max(1), atol=2e-6)
    # the stored range (from the held-out normal images) is the default; σ = 0 switches the blur off
    detector.map_range.copy_(ranges)
    detector.config = dataclasses.replace(config, blur_sigma=0.0)
    unblurred = detector.combine(AnomalyTerms(latent, feature, torch.tensor([40, 40]), torch.zeros(2, 3, 64, 64)))
    np.testing.assert_allclose(unblurred.maps.numpy(), mixed, atol=2e-6)
    np.testing.assert_allclose(unblurred.scores.numpy(), mixed.reshape(2, -1).max(1), atol=2e-6)


# --- the dynamic noise level reaches the prediction ------------------------------------------------------------------


def test_each_images_own_noise_level_reaches_predict():
    """A kNN bank holding image 0's features and bin edges placed by hand: image 0 lies at distance 0,
    below every edge (bin 0 → b_min = 2 → T̂ = 16 → 20); image 1 beyond the last edge (bin 10 → T̂ = 80).
    ``predict`` must reconstruct each image at its own level."""
    detector = untrained(dataclasses.replace(TINY, knn_k=1))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    detector.knn_bank = detector.knn_features(x[:1])
    d = float(detector.knn_distances(x[1:]))
    assert d > 0
    detector.bin_edges = torch.linspace(0.1 * d, 0.5 * d, 11, dtype=torch.float64)
    assert detector.noise_levels(x).tolist() == [20, 80]
    assert detector.terms(x).t_hat.tolist() == [20, 80]

    pred = detector.predict(x)
    torch.testing.assert_close(pred.maps, detector.combine(detector.terms(x, torch.tensor([20, 80]))).maps)
    swapped = detector.combine(detector.terms(x, torch.tensor([80, 20]))).maps
    assert ((pred.maps - swapped).flatten(1).abs().amax(1) > 1e-3).all()  # the level matters for both images

    # move the edges so that image 1 falls in bin 6 (d = 5.5 bin widths): T̂ = round_10(6/10 · 80) = 50;
    # image 0 keeps its level and its map, image 1 gets the map of T̂ = 50
    detector.bin_edges = torch.linspace(0, d / 5.5 * 10, 11, dtype=torch.float64)
    assert detector.noise_levels(x).tolist() == [20, 50]
    moved = detector.predict(x)
    torch.testing.assert_close(moved.maps[0], pred.maps[0])
    assert (moved.maps[1] - pred.maps[1]).abs().max() > 1e-3
    torch.testing.assert_close(moved.maps[1:], detector.combine(detector.terms(x[1:], torch.tensor([50]))).maps)
    # a static level overrides the kNN for every image
    static = detector.variant(static_t=50)
    assert static.noise_levels(x).tolist() == [50, 50]
    torch.testing.assert_close(static.predict(x).maps[1], moved.maps[1])
