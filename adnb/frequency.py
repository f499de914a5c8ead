"""High-frequency extractors: what FAIR keeps of an image before asking a network to restore it.

Two families, both batched torch on any device (FAIR §3.2 and §5.4):

**Frequency-domain high-pass filters.** With the 2-D DFT ``F(u, v)`` of a grey image of size
``M × N`` and ``D(u, v)`` the distance of frequency ``(u, v)`` from the centre of the shifted
spectrum (``D = sqrt((u − M/2)² + (v − N/2)²)``, in cycles per image), the filtered image is
``f_h = IDFT(F · H)`` with one of the transfer functions (Eqs. 2–4)::

    ideal        H_I = 0 if D ≤ D0 else 1
    Gaussian     H_G = 1 − exp(−D² / 2 D0²)
    Butterworth  H_B = 1 / (1 + (D0 / D)^{2n})

``H`` depends only on ``D``, so it is real and even: the filtered image of a real image is real,
and the real FFT (``rfft2``/``irfft2``, half the spectrum) gives exactly what the paper's full
complex FFT and ``real(·)`` give, at about half the cost. ``D0`` is measured in cycles per image
(pixels of the spectrum), so the same ``D0`` removes a larger share of the spectrum of a smaller
image: ``D0 = 30`` at 128² cuts what ``D0 = 60`` cuts at 256².

**Spatial-domain derivatives.** Sobel gradients ``g_x`` (and ``g_y``) with 3×3 or 5×5 kernels,
as OpenCV's ``cv2.Sobel`` computes them (unnormalised, reflect-101 border). Their transfer
function ``∝ sin(2πu/M)`` is directional: ``g_x`` removes every frequency on the axis ``u = 0``.

``high_frequency(images, kind, d0, order)`` turns RGB batches into the network input; the other
functions are the pieces the chapter plots (transfer functions, impulse responses, band energy).
It computes in fp32 (fp64 when given fp64) also inside a bf16 ``autocast`` block, where the Sobel
convolutions would otherwise drop to bf16 (and torch's FFTs have no bf16 kernels at all): what a
high-pass keeps is small next to what it removes (the low frequencies hold most of an image's
energy), and bf16 keeps about 3 significant digits of each pixel, so its rounding error would be
of the order of the detail itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from adnb.runtime.errors import AdnbError
from adnb.runtime.precision import at_least_fp32, full_precision

FILTERS = ("ihpf", "ghpf", "bhpf")
SOBELS = ("sobel_x3", "sobel_xy3", "sobel_x5", "sobel_xy5")
EXTRACTORS = FILTERS + SOBELS
BUTTERWORTH_EPS = 1e-6  # the official code's guard against D = 0 in (D0 / D)^{2n}

# ITU-R BT.601 luma, what cv2.COLOR_BGR2GRAY (FAIR's loader) and kornia.color.rgb_to_grayscale use.
LUMA = (0.299, 0.587, 0.114)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """Grey level ``Y = 0.299 R + 0.587 G + 0.114 B`` of RGB ``images`` (B×3×H×W → B×1×H×W)."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def frequency_distance(height: int, width: int, *, half: bool = False, device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``D(u, v)`` in the DFT's own (unshifted) order, H×W (or H×(W//2+1) with ``half``).

    The signed integer frequencies ``k`` (``torch.fft.fftfreq(M) · M``) are the shifted
    coordinates ``u − M/2`` read in unshifted order, so ``D = sqrt(k_u² + k_v²)`` equals the
    paper's distance to the centre without shifting anything. ``half`` gives the columns the
    real FFT keeps.
    """
    ku = torch.fft.fftfreq(height, device=device, dtype=dtype) * height
    kv = (torch.fft.rfftfreq(width, device=device, dtype=dtype) if half
          else torch.fft.fftfreq(width, device=device, dtype=dtype)) * width
    return torch.sqrt(ku[:, None] ** 2 + kv[None, :] ** 2)


def ideal_highpass(distance: torch.Tensor, d0: float) -> torch.Tensor:
    """``H_I(D) = 0 for D ≤ D0, 1 otherwise`` (Eq. 2)."""
    return (distance > d0).to(distance.dtype)


def gaussian_highpass(distance: torch.Tensor, d0: float) -> torch.Tensor:
    """``H_G(D) = 1 − exp(−D² / (2 D0²))`` (Eq. 3)."""
    return 1 - torch.exp(-distance ** 2 / (2 * d0 ** 2))


def butterworth_highpass(distance: torch.Tensor, d0: float, order: int = 2) -> torch.Tensor:
    """``H_B(D) = 1 / (1 + (D0 / D)^{2n})`` (Eq. 4); ``D + 1e-6`` as in the official code."""
    return 1 / (1 + (d0 / (distance + BUTTERWORTH_EPS)) ** (2 * order))


def transfer_function(kind: str, height: int, width: int, d0: float, order: int = 2, *, half: bool = False,
                      centred: bool = False, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H(u, v)`` of filter ``kind`` (``ihpf``, ``ghpf``, ``bhpf``), in DFT order or ``centred`` (fftshift)."""
    if kind not in FILTERS:
        raise AdnbError(f"unknown high-pass filter {kind!r}; valid: {', '.join(FILTERS)}")
    if d0 <= 0:
        raise AdnbError(f"the cutoff D0 must be positive (got {d0}); FAIR uses D0 = 30")
    distance = frequency_distance(height, width, half=half, device=device, dtype=dtype)
    if kind == "ihpf":
        h = ideal_highpass(distance, d0)
    elif kind == "ghpf":
        h = gaussian_highpass(distance, d0)
    else:
        h = butterworth_highpass(distance, d0, order)
    if centred:
        if half:
            raise AdnbError("a centred transfer function needs the full spectrum (half=False)")
        h = torch.fft.fftshift(h)
    return h


def highpass(gray: torch.Tensor, kind: str = "bhpf", d0: float = 30.0, order: int = 2) -> torch.Tensor:
    """``IDFT(DFT(gray) · H)`` for a batch of grey images (…×H×W), with the real FFT (Eqs. 5–6)."""
    height, width = gray.shape[-2:]
    h = transfer_function(kind, height, width, d0, order, half=True, device=gray.device, dtype=gray.dtype)
    return torch.fft.irfft2(torch.fft.rfft2(gray) * h, s=(height, width))


def impulse_response(kind: str, size: int, d0: float, order: int = 2) -> torch.Tensor:
    """The spatial kernel ``h = IDFT(H)`` of a filter, centred at pixel (size/2, size/2) (paper Fig. 5).

    Filtering is circular convolution with ``h``; its oscillations around the centre are the
    ringing the filter causes. ``h`` of a high-pass is a delta minus a low-pass kernel.
    """
    h = transfer_function(kind, size, size, d0, order, half=True, dtype=torch.float64)
    return torch.fft.fftshift(torch.fft.irfft2(h, s=(size, size)))


def ringing(kind: str, size: int, d0: float, order: int = 2) -> float:
    """Ringing of a filter: its kernel's largest positive side lobe over its main negative lobe.

    A high-pass kernel is a delta minus a low-pass blob; an edge filtered by it overshoots where
    the blob has positive side lobes. 0 for the Gaussian (no side lobes), largest for the ideal filter.
    """
    h = impulse_response(kind, size, d0, order)
    h[size // 2, size // 2] = 0  # drop the delta
    return float(h.max().clamp(min=0) / -h.min())


def sobel_kernels(size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's Sobel kernels (k_x, k_y) for ``cv2.Sobel(…, 1, 0)`` and ``(…, 0, 1)``, as correlation weights.

    ``k_x = smooth ⊗ diff`` with smooth = binomial row (1 2 1 or 1 4 6 4 1) and
    diff = (−1 0 1) or (−1 −2 0 2 1); ``k_y`` is its transpose.
    """
    if size == 3:
        smooth, diff = [1.0, 2.0, 1.0], [-1.0, 0.0, 1.0]
    elif size == 5:
        smooth, diff = [1.0, 4.0, 6.0, 4.0, 1.0], [-1.0, -2.0, 0.0, 2.0, 1.0]
    else:
        raise AdnbError(f"Sobel kernel size must be 3 or 5 (got {size})")
    kx = torch.outer(torch.tensor(smooth), torch.tensor(diff))
    return kx, kx.t().contiguous()


def sobel(gray: torch.Tensor, size: int = 3, directions: str = "xy") -> torch.Tensor:
    """Sobel gradients of grey images B×1×H×W: ``g_x`` (``"x"``) or ``[g_x, g_y]`` (``"xy"``) as channels."""
    if directions not in ("x", "xy"):
        raise AdnbError(f"Sobel directions must be 'x' or 'xy' (got {directions!r})")
    kx, ky = sobel_kernels(size)
    kernels = [kx] if directions == "x" else [kx, ky]
    weight = torch.stack(kernels)[:, None].to(gray.device, gray.dtype)
    pad = size // 2
    return F.conv2d(F.pad(gray, (pad, pad, pad, pad), mode="reflect"), weight)


def input_channels(kind: str) -> int:
    """How many channels ``high_frequency`` gives for ``kind`` (2 for the xy Sobel variants)."""
    if kind not in EXTRACTORS:
        raise AdnbError(f"unknown high-frequency extractor {kind!r}; valid: {', '.join(EXTRACTORS)}")
    return 2 if kind.startswith("sobel_xy") else 1


def high_frequency(images: torch.Tensor, kind: str = "bhpf", d0: float = 30.0, order: int = 2) -> torch.Tensor:
    """FAIR's network input: the grey level of RGB ``images`` (B×3×H×W in [0, 1]), high-passed.

    ``kind``: ``ihpf``/``ghpf``/``bhpf`` (cutoff ``d0``, Butterworth ``order``) or
    ``sobel_x3``/``sobel_xy3``/``sobel_x5``/``sobel_xy5`` (d0 and order unused).
    """
    input_channels(kind)
    with full_precision(images.device):  # fp32 even under autocast: see the module's docstring
        gray = to_gray(at_least_fp32(images))
        if kind in FILTERS:
            return highpass(gray, kind, d0, order)
        directions, size = kind.removeprefix("sobel_")[:-1], int(kind[-1])
        return sobel(gray, size, directions)


def radial_energy(gray: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Share of spectral energy ``Σ|F|²`` in each band ``edges[i] ≤ D < edges[i+1]`` (paper Fig. 9).

    ``gray`` is …×H×W; returns …×(len(edges)−1), each row summing to the share of energy the
    bands cover (1 when they cover every frequency). Uses the full spectrum (no Hermitian
    bookkeeping).
    """
    height, width = gray.shape[-2:]
    power = torch.fft.fft2(gray.to(torch.float64)).abs() ** 2
    distance = frequency_distance(height, width, device=gray.device, dtype=torch.float64)
    band = torch.bucketize(distance, edges.to(distance), right=True) - 1  # index i with edges[i] ≤ D < edges[i+1]
    n_bands = len(edges) - 1
    flat = power.flatten(-2)
    index = band.flatten().clamp(0, n_bands).expand_as(flat)
    keep = ((band.flatten() >= 0) & (band.flatten() < n_bands)).to(flat.dtype)
    sums = torch.zeros(*flat.shape[:-1], n_bands + 1, dtype=flat.dtype, device=flat.device)
    sums.scatter_add_(-1, index, flat * keep)
    return (sums[..., :n_bands] / flat.sum(-1, keepdim=True)).to(gray.dtype)


def cutoff_share(d0: float, size: int) -> float:
    """Share of the frequency plane inside ``D ≤ D0`` for a ``size × size`` image: π D0² / size²."""
    return min(1.0, math.pi * d0 ** 2 / size ** 2)
