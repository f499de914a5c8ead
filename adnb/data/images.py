"""Reading images and masks of any common kind into one form: RGB uint8 and boolean masks.

PNG, JPG, BMP and TIFF; grey, RGB, RGBA; 8-bit, 16-bit and float. A file that cannot be decoded
raises an error naming it, instead of a ``NoneType`` surprise three calls later.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from adnb.runtime.errors import AdnbError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _decode(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)  # works with any path encoding, unlike cv2.imread
    except OSError as exc:
        raise AdnbError(f"cannot read {path}: {exc.strerror}") from None
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:  # cv2 gives up on some TIFF variants; Pillow may not
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
                if array.ndim == 3 and array.shape[2] >= 3:
                    array = array[..., [2, 1, 0, *range(3, array.shape[2])]]  # to cv2's BGR(A)
        except Exception:  # noqa: BLE001 - any decoder failure means the same thing to the user
            raise AdnbError(f"cannot decode {path}: not an image or a damaged file; replace or remove it") from None
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if np.nanmax(array) <= 1.0 else float(np.nanmax(array))
        return np.clip(np.nan_to_num(array) / top * 255 + 0.5, 0, 255).astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    return np.clip(array, 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An image as an ``H×W×3`` RGB ``uint8`` array (grey is repeated, alpha dropped)."""
    path = Path(path)
    array = _to_uint8(_decode(path))
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, 2::-1])
    raise AdnbError(f"{path} has shape {array.shape}; expected a grey, RGB or RGBA image")


def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as a boolean ``H×W`` array: any non-zero value is anomalous.

    Binarising here is what makes VisA's masks (values 0/1…) and anti-aliased masks safe.
    """
    array = _decode(Path(path))
    if array.ndim == 3:
        array = array.max(axis=2)
    return np.asarray(array) != 0


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels when possible."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001
        return read_image(path).shape[:2]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize; area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[:2] == (size, size):
        return image
    shrink = size < min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean mask: area-weighted coverage, then ≥ 0.5 (no grown or eroded regions)."""
    if mask.shape == (size, size):
        return mask
    shrink = size < min(mask.shape)
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cover >= 0.5
