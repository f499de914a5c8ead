"""The high-frequency extractors against the paper's formulas, the official numpy code and OpenCV."""

import cv2
import kornia
import numpy as np
import pytest
import torch

from adnb import frequency as fq
from adnb.runtime.errors import AdnbError


def official_highpass(gray: np.ndarray, kind: str, d0: float, order: int = 2) -> np.ndarray:
    """FAIR's loader, one image at a time: fftshift(fft2) · H(D to the centre) → real(ifft2(ifftshift))."""
    rows, cols = gray.shape
    shifted = np.fft.fftshift(np.fft.fft2(gray))
    y, x = np.ogrid[:rows, :cols]
    dist = np.sqrt((y - rows // 2) ** 2 + (x - cols // 2) ** 2)
    h = {"ihpf": (dist > d0).astype(float),
         "ghpf": 1 - np.exp(-dist ** 2 / (2 * d0 ** 2)),
         "bhpf": 1 / (1 + (d0 / (dist + 1e-6)) ** (2 * order))}[kind]
    return np.real(np.fft.ifft2(np.fft.ifftshift(shifted * h)))


@pytest.mark.parametrize("kind", fq.FILTERS)
@pytest.mark.parametrize("shape", [(64, 64), (65, 65), (48, 80)])
def test_highpass_matches_the_official_complex_fft(kind, shape):
    rng = np.random.default_rng(0)
    images = rng.random((3, *shape))
    out = fq.highpass(torch.from_numpy(images)[:, None], kind, d0=9.0, order=3).numpy()[:, 0]
    for image, got in zip(images, out):
        np.testing.assert_allclose(got, official_highpass(image, kind, 9.0, 3), atol=1e-10)


@pytest.mark.parametrize("kind", fq.FILTERS)
def test_a_cosine_passes_with_the_gain_of_the_transfer_function(kind):
    """Filtering cos(2π(k_u y + k_v x)/N) multiplies it by H(D) with D = |(k_u, k_v)|: Eqs. 2–4 themselves."""
    n, d0 = 64, 8.0
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    for ku, kv in [(0, 3), (4, 5), (6, 6), (0, 8), (10, 2), (20, 0)]:
        wave = torch.cos(2 * np.pi * (ku * y + kv * x) / n)
        d = torch.tensor(float(np.hypot(ku, kv)), dtype=torch.float64)
        gain = {"ihpf": fq.ideal_highpass(d, d0), "ghpf": fq.gaussian_highpass(d, d0),
                "bhpf": fq.butterworth_highpass(d, d0, 2)}[kind]
        torch.testing.assert_close(fq.highpass(wave, kind, d0), gain * wave, atol=1e-10, rtol=0)


def test_transfer_function_values():
    d = torch.tensor([0.0, 30.0, 30.5, 1e6])
    assert fq.ideal_highpass(d, 30).tolist() == [0, 0, 1, 1]
    assert fq.gaussian_highpass(d, 30)[1].item() == pytest.approx(1 - np.exp(-0.5))
    assert fq.butterworth_highpass(d, 30, 2)[1].item() == pytest.approx(0.5)  # half power at D0
    for h in (fq.gaussian_highpass(d, 30), fq.butterworth_highpass(d, 30, 2)):
        assert h[0] < 1e-12 and h[-1] == pytest.approx(1.0)  # DC removed, top frequencies kept
    steep = fq.butterworth_highpass(torch.tensor([20.0]), 30, 8)
    assert steep < fq.butterworth_highpass(torch.tensor([20.0]), 30, 2)  # a higher order is closer to ideal


def test_centred_transfer_function_has_its_minimum_in_the_middle():
    h = fq.transfer_function("bhpf", 64, 64, 10, centred=True)
    assert tuple(np.unravel_index(int(h.argmin()), h.shape)) == (32, 32)
    with pytest.raises(AdnbError):
        fq.transfer_function("bhpf", 64, 64, 10, half=True, centred=True)


def test_ringing_ideal_strong_butterworth_weak_gaussian_none():
    """Fig. 5: the kernel is a delta minus a low-pass lobe; ringing is the positive overshoot around it."""
    assert fq.ringing("ghpf", 128, 10) < 1e-8
    assert 0.005 < fq.ringing("bhpf", 128, 10) < 0.05
    assert fq.ringing("ihpf", 128, 10) > 0.1
    assert fq.ringing("bhpf", 128, 10, order=8) > fq.ringing("bhpf", 128, 10, order=2)  # steeper rings more
    for kind in fq.FILTERS:  # the kernel sums to H(0) = 0: flat regions map to 0
        assert abs(float(fq.impulse_response(kind, 64, 10).sum())) < 1e-9


@pytest.mark.parametrize("size", [3, 5])
def test_sobel_matches_opencv(size):
    rng = np.random.default_rng(1)
    gray = rng.random((2, 40, 52)).astype(np.float32)
    out = fq.sobel(torch.from_numpy(gray)[:, None], size, "xy").numpy()
    only_x = fq.sobel(torch.from_numpy(gray)[:, None], size, "x").numpy()
    assert out.shape == (2, 2, 40, 52) and only_x.shape == (2, 1, 40, 52)
    for i in range(2):
        np.testing.assert_allclose(out[i, 0], cv2.Sobel(gray[i], cv2.CV_32F, 1, 0, ksize=size), atol=1e-5)
        np.testing.assert_allclose(out[i, 1], cv2.Sobel(gray[i], cv2.CV_32F, 0, 1, ksize=size), atol=1e-5)
        np.testing.assert_allclose(only_x[i, 0], out[i, 0])


def test_gray_matches_opencv_and_kornia():
    rng = np.random.default_rng(2)
    rgb = rng.random((16, 20, 3)).astype(np.float32)
    ours = fq.to_gray(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2GRAY), atol=1e-6)
    np.testing.assert_allclose(ours, kornia.color.rgb_to_grayscale(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy(),
                               atol=1e-6)


def test_high_frequency_is_batched_and_removes_brightness():
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.random((4, 3, 32, 32)).astype(np.float32))
    for kind in fq.EXTRACTORS:
        out = fq.high_frequency(images, kind, d0=6)
        assert out.shape == (4, fq.input_channels(kind), 32, 32) and out.dtype == torch.float32
        one_by_one = torch.cat([fq.high_frequency(images[i:i + 1], kind, d0=6) for i in range(4)])
        torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=0)
        # a brighter copy has the same high frequencies: no absolute brightness reaches the network
        torch.testing.assert_close(fq.high_frequency(images * 0.5 + 0.3, kind, d0=6), out * 0.5, atol=1e-4, rtol=0)
    with pytest.raises(AdnbError, match="unknown high-frequency extractor"):
        fq.high_frequency(images, "laplace")
    with pytest.raises(AdnbError, match="Sobel kernel size"):
        fq.sobel_kernels(7)


def test_radial_energy_bands():
    n = 64
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    wave = 1.0 + torch.cos(2 * np.pi * (6 * y + 8 * x) / n)  # DC + a wave at D = 10
    edges = torch.tensor([0.0, 5.0, 10.0, 20.0, 100.0])
    energy = fq.radial_energy(wave[None], edges)[0]
    # DC carries n⁴ of Σ|F|², the two conjugate peaks n⁴/4 each
    torch.testing.assert_close(energy, torch.tensor([2 / 3, 0.0, 1 / 3, 0.0], dtype=torch.float64))
    noise = torch.rand(3, n, n, generator=torch.Generator().manual_seed(0))
    assert fq.radial_energy(noise, edges).sum(-1).allclose(torch.ones(3))
