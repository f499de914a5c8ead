"""The invertible Laplacian pyramid of PyramidFlow, as pure functions.

Every operator acts on each channel of a B×C×H×W tensor on its own::

    blur(x)       = x ∗ B,   B = b bᵀ,  b = [1, 4, 6, 4, 1] / 16     (5×5 binomial, zero padding 2)
    down(x)       = P(blur(x))        P = 2×2 max-pool (official code) or nearest: keep every
                                      other pixel (the paper's supplement)
    up(x, size)   = blur(N(x, size))  N = nearest-neighbour upsampling to ``size``

    build:    g_0 = x,  g_{k+1} = down(g_k);   l_k = g_k − up(g_{k+1}) for k < L−1,  l_{L−1} = g_{L−1}
    compose:  x = l_0 + up(l_1 + up(l_2 + … up(l_{L−1})))

``compose(build(x)) == x`` for any ``down``: compose rebuilds g_k = l_k + up(g_{k+1}) from the
coarsest level upwards, and ``up`` is the same function on both sides. Unlike Burt and Adelson's
pyramid, ``up`` has no ×4 gain and ``down`` need not be linear (max-pool is not); neither matters
for invertibility. What does matter: H and W must be divisible by 2^(L−1), so every level has
exactly half the side of the one above.

``build`` and ``compose`` work in fp32 (fp64 when given fp64), also inside a bf16 ``autocast``
block: a detail level ``l_k = g_k − up(g_{k+1})`` is a small difference of two large numbers, and
bf16's 3 significant digits would leave rounding noise of its own size, so the pyramid would be
neither invertible nor a faithful split into frequency bands. Their outputs are channels-last
(NHWC): the depthwise blur and the convolutions that consume the levels run fastest in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from adnb.runtime.precision import at_least_fp32, full_precision

DOWNSAMPLING = ("max", "nearest")


def binomial_kernel() -> torch.Tensor:
    """The 5×5 binomial kernel B = b bᵀ with b = [1, 4, 6, 4, 1] / 16 (it sums to 1)."""
    b = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
    return torch.outer(b, b)


@lru_cache(maxsize=32)
def _depthwise_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return binomial_kernel().to(dtype=dtype, device=device).expand(channels, 1, 5, 5).contiguous()


def blur(x: torch.Tensor) -> torch.Tensor:
    """Per-channel 5×5 binomial filter with zero padding (a depthwise convolution).

    CPU depthwise convolutions run several times faster in channels-last memory layout, which
    pays for the two layout copies; the result has the input's layout.
    """
    c = x.shape[1]
    kernel = _depthwise_kernel(c, x.dtype, x.device)
    if x.device.type != "cpu":
        return F.conv2d(x, kernel, padding=2, groups=c)
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel, padding=2, groups=c)
    return y.contiguous(memory_format=layout)


def down(x: torch.Tensor, mode: str = "max") -> torch.Tensor:
    """Blur, then halve the resolution: 2×2 max-pool (``"max"``) or keep every other pixel (``"nearest"``)."""
    y = blur(x)
    if mode == "max":
        return F.max_pool2d(y, kernel_size=2, stride=2)
    if mode == "nearest":
        return y[:, :, ::2, ::2]
    raise ValueError(f"unknown downsampling {mode!r}; valid: {', '.join(DOWNSAMPLING)}")


def up(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling to ``size`` (H, W), then blur."""
    return blur(F.interpolate(x, size=tuple(size), mode="nearest"))


def _fp32_nhwc(x: torch.Tensor) -> torch.Tensor:
    return at_least_fp32(x).contiguous(memory_format=torch.channels_last)


def build(x: torch.Tensor, levels: int, mode: str = "max") -> list[torch.Tensor]:
    """The pyramid [l_0 (finest, x's size), …, l_{L−1} (coarsest)] of ``x`` (fp32, channels-last)."""
    with full_precision(x.device):
        gaussian = [_fp32_nhwc(x)]
        for _ in range(levels - 1):
            gaussian.append(down(gaussian[-1], mode))
        details = [g - up(g_next, g.shape[-2:]) for g, g_next in zip(gaussian[:-1], gaussian[1:])]
    return details + [gaussian[-1]]


def compose(pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``build``: x = l_0 + up(l_1 + up(… + up(l_{L−1}))) (fp32, channels-last)."""
    with full_precision(pyramid[-1].device):
        x = _fp32_nhwc(pyramid[-1])
        for level in reversed(pyramid[:-1]):
            x = up(x, level.shape[-2:]) + at_least_fp32(level)  # the NHWC operand first: NHWC sum
    return x
