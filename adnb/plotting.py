"""Figures shared by the chapters and the CLI: image grids, mask outlines, anomaly-map overlays.

Model code never imports this module; notebooks and ``python -m adnb score`` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch


def as_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (3, H, W) or (H, W, 3) tensor/array, uint8 or float in [0, 1], as an H×W×3 float array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255
    if x.ndim == 2 or x.shape[-1] == 1:
        x = np.repeat(x.reshape(*x.shape[:2], 1), 3, axis=2)
    return np.clip(x, 0, 1)


def overlay(image: torch.Tensor | np.ndarray, amap: torch.Tensor | np.ndarray, *, vmin: float | None = None,
            vmax: float | None = None, alpha: float = 0.5) -> np.ndarray:
    """An anomaly map in the jet colormap blended over its image; returns H×W×3 uint8 (RGB).

    The map is resized to the image if needed; ``vmin``/``vmax`` fix the colour scale (by default
    the map's own range), so several overlays can share one scale.
    """
    rgb = as_image(image)
    amap = amap.detach().cpu().float().numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap, np.float32)
    if amap.shape != rgb.shape[:2]:
        amap = cv2.resize(amap, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    scaled = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1].astype(np.float32) / 255
    return (((1 - alpha) * rgb + alpha * heat).clip(0, 1) * 255).round().astype(np.uint8)


def outline(ax, mask: torch.Tensor | np.ndarray, color: str = "red", width: float = 1.0) -> None:  # noqa: ANN001
    """Draw a mask's boundary on a matplotlib axis."""
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=width)


def image_grid(rows: Sequence[Sequence[torch.Tensor | np.ndarray]], *, titles: Sequence[Sequence[str]] | None = None,
               row_labels: Sequence[str] | None = None, masks: Sequence[Sequence[object]] | None = None,
               size: float = 1.8, cmap: str | None = None):  # noqa: ANN201 - a matplotlib Figure
    """A grid of images (rows × columns), with optional titles, row labels and mask outlines.

    2-D entries are drawn with ``cmap`` (e.g. maps); ``None`` cells stay empty.
    """
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            item = row[j] if j < len(row) else None
            if item is None:
                continue
            array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if array.ndim == 2:
                ax.imshow(array, cmap=cmap or "viridis")
            else:
                ax.imshow(as_image(item))
            if masks is not None and masks[i][j] is not None:
                outline(ax, masks[i][j])
            if titles is not None and titles[i][j]:
                ax.set_title(titles[i][j], fontsize=8)
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i], fontsize=9)
    fig.tight_layout()
    return fig


def epoch_curve(ax, values: Sequence[float], **kwargs) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Per-epoch values at epochs 1 … n, each a marker on the line: a run of one epoch is a point, not empty axes."""
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(values) + 1)
    ax.plot(epochs, list(values), marker="o", markersize=4, **kwargs)
    if len(values) <= 10:  # epochs are whole: no tick at 1.5 (a locator cannot avoid it on a range of one)
        ax.set_xticks(list(epochs))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
