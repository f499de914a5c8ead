"""FAIR: network size, the anomaly evaluation function against hand computations and NumPy/SciPy/OpenCV
references, the corruption mix, training."""

import math

import cv2
import kornia
import numpy as np
import pytest
import torch
from scipy import ndimage

from adnb.methods import load_detector
from adnb.methods import fair
from adnb.runtime.cache import entry
from adnb.runtime.errors import AdnbError
from adnb.synthesis import TextureSource


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurry random colour images in [0, 1] (gradients of realistic size)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("width", "millions"), [(128, 69.05), (32, 4.32)])
def test_parameter_count_matches_the_official_network(width, millions):
    unet = fair.RestorationUNet(1, width)
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_unet_shapes_and_initialisation():
    unet = fair.RestorationUNet(2, 8).initialise(torch.Generator().manual_seed(0))
    assert unet(torch.randn(2, 2, 32, 32)).shape == (2, 3, 32, 32)
    conv_weights = torch.cat([m.weight.flatten() for m in unet.modules() if isinstance(m, torch.nn.Conv2d)])
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(AdnbError, match="multiple of 16"):
        fair.FAIR(fair.FairConfig(image_size=100))
    with pytest.raises(AdnbError, match="unknown extractor"):
        fair.FAIR(fair.FairConfig(extractor="fourier"))


def reference_msgms(a: np.ndarray, b: np.ndarray, c: float = 0.0026) -> np.ndarray:
    """RIAD/FAIR's MSGMS with scipy and OpenCV, one image (3, H, W) at a time: 1 − mean over scales and channels."""
    px = np.array([[1, 0, -1]] * 3, float) / 3

    def gms(x, y):
        def mag(z):
            return np.sqrt(ndimage.correlate(z, px, mode="constant") ** 2
                           + ndimage.correlate(z, px.T, mode="constant") ** 2 + 1e-12)
        gx, gy = mag(x), mag(y)
        return (2 * gx * gy + c) / (gx ** 2 + gy ** 2 + c + 1e-12)

    h, w = a.shape[1:]
    total = np.zeros((3, h, w))
    for ch in range(3):
        total[ch] += gms(a[ch], b[ch])
        small = gms(cv2.resize(a[ch], (w // 2, h // 2), interpolation=cv2.INTER_AREA),
                    cv2.resize(b[ch], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
        total[ch] += cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return 1 - (total / 2).mean(0)


def test_msgms_matches_a_scipy_opencv_reference():
    a, b = smooth_images(2, 32, 0).double(), smooth_images(2, 32, 1).double()
    ours = 1 - fair.msgms(a, b)[:, 0].numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], reference_msgms(a[i].numpy(), b[i].numpy()), atol=1e-9)
    assert torch.allclose(fair.msgms(a, a), torch.ones(2, 1, 32, 32, dtype=torch.float64))


def test_msgms_of_linear_ramps_against_a_flat_image_by_hand():
    """A linear image p·x + q·y has Prewitt (÷3) gradient magnitude 2·√(p² + q²) away from the border,
    and 4·√(p² + q²) after 2×2 average pooling (the slope per pixel doubles); a flat image has
    √(0 + 1e-12) = 1e-6. So, inside, GMS = (2 g 1e-6 + c) / (g² + 1e-12 + c + 1e-12) at each scale."""
    s, c, n = 0.02, 0.0026, 32
    y, x = np.meshgrid(np.arange(n, dtype=float), np.arange(n, dtype=float), indexing="ij")
    slopes = [(s, 0.0), (0.0, s), (2 * s, s)]  # (p, q) per channel: along x, along y, diagonal
    ramps = torch.tensor(np.stack([0.1 + p * x + q * y for p, q in slopes]))[None]
    flat = torch.full_like(ramps, 0.5)

    def gms(g):
        g = math.sqrt(g ** 2 + 1e-12)
        return (2 * g * 1e-6 + c) / (g ** 2 + 1e-12 + c + 1e-12)

    want = 1 - np.mean([(gms(2 * math.hypot(p, q)) + gms(4 * math.hypot(p, q))) / 2 for p, q in slopes])
    got = 1 - fair.msgms(ramps, flat)[0, 0].numpy()
    inside = got[4:-4, 4:-4]  # clear of the zero padding at both scales and of the upsampling's reach
    np.testing.assert_allclose(inside, np.full_like(inside, want), atol=1e-9)
    assert 0.5 < want < 0.7  # the two scales disagree (0.62 and 0.29 for the first channel): both count
    np.testing.assert_allclose(fair.msgms(flat, flat).numpy(), 1.0, atol=1e-12)


def cie_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (…, 3) → CIELAB (D65) from the standards' formulas, with NumPy; like kornia (and unlike
    OpenCV, which clips) it extends the curves' linear pieces to values outside [0, 1]."""
    rgb = np.asarray(rgb, np.float64)
    linear = np.where(rgb > 0.04045, ((np.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
    t = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    e = 6 / 29
    f = np.where(t > e ** 3, np.cbrt(np.maximum(t, e ** 3)), t / (3 * e ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def test_the_numpy_lab_reference_is_opencvs_lab():
    np.testing.assert_allclose(cie_lab([1.0, 0.0, 0.0]), [53.24, 80.09, 67.20], atol=0.01)  # sRGB red, tabulated
    x = np.random.default_rng(0).uniform(0, 1, (20, 20, 3))
    np.testing.assert_allclose(cie_lab(x), cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2Lab), atol=0.35)


def reference_anomaly_map(image: np.ndarray, restored: np.ndarray, k: float = 3e-4, size: int = 21) -> np.ndarray:
    """FAIR's pixel score from the pieces above: mean_size×size(1 − MSGMS + k · Δab²), zero padded (scipy)."""
    colour = ((cie_lab(image.transpose(1, 2, 0))[..., 1:] - cie_lab(restored.transpose(1, 2, 0))[..., 1:]) ** 2).sum(-1)
    return ndimage.uniform_filter(reference_msgms(restored, image) + k * colour, size=size, mode="constant")


def test_anomaly_map_matches_the_reference_and_each_term_counts():
    images = smooth_images(2, 32, 2).double()
    restored = (0.8 * images + 0.2 * smooth_images(2, 32, 3).double())  # wrong colours and gradients everywhere
    restored[1, :, 8:16, 20:28] = torch.tensor([0.9, 0.1, 0.2], dtype=torch.float64).view(3, 1, 1)  # a red patch
    ours = fair.anomaly_map(images, restored)[:, 0].numpy()
    for i in range(2):
        want = reference_anomaly_map(images[i].numpy(), restored[i].numpy())
        np.testing.assert_allclose(ours[i], want, atol=1e-7)
        # each part is large enough that getting it wrong would show: the colour term, its weight, the smoothing
        without_colour = ndimage.uniform_filter(reference_msgms(restored[i].numpy(), images[i].numpy()), 21,
                                                mode="constant")
        assert np.abs(want - without_colour).max() > 0.05
        assert np.abs(ours[i] - reference_anomaly_map(images[i].numpy(), restored[i].numpy(), size=1)).max() > 0.05


def test_color_difference_agrees_with_opencv_lab_and_the_bgr_switch():
    a, b = smooth_images(1, 16, 2), smooth_images(1, 16, 3)
    ours = fair.color_difference(a, b)[0, 0].numpy()

    def lab(x):
        return cv2.cvtColor(x[0].permute(1, 2, 0).numpy().copy(), cv2.COLOR_RGB2LAB)

    np.testing.assert_allclose(kornia.color.rgb_to_lab(a)[0].permute(1, 2, 0).numpy(), lab(a), atol=0.3)
    ref = ((lab(a)[..., 1:] - lab(b)[..., 1:]) ** 2).sum(-1)  # OpenCV's Lab constants differ in the 3rd digit
    np.testing.assert_allclose(ours, ref, atol=0.03 * ref.max())
    torch.testing.assert_close(fair.color_difference(a, b, from_bgr=True), fair.color_difference(a.flip(1), b.flip(1)))
    assert not torch.allclose(fair.color_difference(a, b, from_bgr=True), fair.color_difference(a, b))
    assert fair.color_difference(a, a).abs().max() == 0


def test_mean_filter_is_a_zero_padded_box():
    x = torch.rand(1, 1, 30, 30, dtype=torch.float64)
    ref = ndimage.uniform_filter(x[0, 0].numpy(), size=21, mode="constant")
    np.testing.assert_allclose(fair.mean_filter(x, 21)[0, 0].numpy(), ref, atol=1e-12)


def test_anomaly_map_is_zero_for_a_perfect_restoration_and_peaks_at_a_defect():
    images = smooth_images(2, 64)
    assert fair.anomaly_map(images, images).abs().max() < 1e-6
    restored = images.clone()
    restored[1, :, 40:48, 10:18] = 0.9  # a flat patch the "model" failed to restore
    amap = fair.anomaly_map(images, restored)
    assert amap[0].abs().max() < 1e-6
    peak = np.unravel_index(int(amap[1, 0].argmax()), (64, 64))
    assert 36 <= peak[0] <= 52 and 6 <= peak[1] <= 22


def test_restoration_loss_is_l2_plus_kornia_ssim():
    a, b = smooth_images(2, 32, 4), smooth_images(2, 32, 5)
    expected = torch.nn.functional.mse_loss(a, b) + 2 * kornia.losses.ssim_loss(a, b, 11)  # kornia: (1 − SSIM)/2
    torch.testing.assert_close(fair.restoration_loss(a, b), expected)
    assert fair.restoration_loss(a, a).abs() < 1e-6


def test_corruption_mix_and_rotation():
    images = smooth_images(8, 32)
    textures = TextureSource.from_images(images)
    g = torch.Generator().manual_seed(0)
    kinds = []
    for _ in range(40):
        sample = fair.corrupt(images, textures, generator=g)
        kinds.append(sample.kinds)
        clean = sample.kinds == fair.CLEAN
        assert torch.equal(sample.inputs[clean], sample.targets[clean])
        assert sample.masks[clean].sum() == 0 and (sample.masks[~clean].flatten(1).sum(1) > 0).all()
    share = torch.bincount(torch.cat(kinds), minlength=3).float() / (40 * 8)
    torch.testing.assert_close(share, torch.tensor([0.5, 0.25, 0.25]), atol=0.06, rtol=0)

    rotated = fair.corrupt(images, textures, rotate_prob=1.0, generator=torch.Generator().manual_seed(1)).targets
    kept = fair.corrupt(images, textures, rotate_prob=0.0, generator=torch.Generator().manual_seed(1)).targets
    assert torch.equal(kept, images) and not torch.allclose(rotated, images)
    again = fair.corrupt(images, textures, generator=torch.Generator().manual_seed(7))
    first = fair.corrupt(images, textures, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.inputs, first.inputs)  # one seed, one batch


def test_milestones():
    assert fair.milestones(800) == [640, 720]
    assert fair.milestones(30) == [24, 27]


def test_fit_lowers_the_loss_and_the_checkpoint_round_trips(tmp_path):
    images = (smooth_images(16, 32) * 255).to(torch.uint8)
    config = fair.FairConfig(image_size=32, width=8, epochs=6, lr=2e-3)
    cache = entry("fair", config, "test-data", root=tmp_path)
    detector = fair.fit(config, images, cache=cache)
    losses = [h["loss"] for h in detector.fit_info["history"]]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    assert detector.fit_info["textures"] == "images"

    test = smooth_images(3, 32, 9)
    before = detector.predict(test)
    loaded = load_detector(detector.checkpoint)
    after = loaded.predict(test)
    assert isinstance(loaded, fair.FAIR) and loaded.config == config
    torch.testing.assert_close(after.maps, before.maps)
    assert before.maps.shape == (3, 32, 32) and before.scores.shape == (3,)
    # the prediction is FAIR's score of the network's own restoration (unclamped: an early network's
    # colours leave [0, 1], which the NumPy Lab takes as kornia does), the image score its maximum
    with torch.no_grad():
        restored = detector(test).double().numpy()
    want = np.stack([reference_anomaly_map(test[i].double().numpy(), restored[i]) for i in range(3)])
    np.testing.assert_allclose(before.maps.numpy(), want, atol=2e-5)
    np.testing.assert_allclose(before.scores.numpy(), want.reshape(3, -1).max(1), atol=2e-5)

    again = fair.fit(config, images, cache=cache)  # cached: no training
    torch.testing.assert_close(again.predict(test).maps, before.maps)
    assert again.train_seconds == pytest.approx(detector.train_seconds)


def test_fit_rejects_images_of_the_wrong_size():
    with pytest.raises(AdnbError, match="image_size"):
        fair.fit(fair.FairConfig(image_size=32, width=4, epochs=1), torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
