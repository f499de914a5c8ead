"""Reading images and masks of any common kind into one form: RGB uint8 and boolean masks.

PNG, JPG, BMP and TIFF; grey, RGB, RGBA; 8-bit, 16-bit and float. A file that cannot be decoded
raises ``ImageReadError`` naming it and the reason (empty, not an image, damaged or truncated),
instead of a ``NoneType`` surprise three calls later.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from adnb.runtime.errors import AdnbError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(AdnbError):
    """A file that cannot be read as an image: ``path`` names it, ``reason`` says why (no path in it).

    The message is the whole sentence for a user; a caller that skips such files (``adnb score``)
    prints ``path`` and ``reason`` on one line instead.
    """

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read {path} as an image: {reason}; replace or remove the file")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # picklable across worker processes
        return type(self), (self.path, self.reason)


# File signatures: enough to tell "a damaged image" from "not an image at all".
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF",
              b"MM\x00*": "TIFF", b"RIFF": "WebP"}


def sniff_format(head: bytes) -> str | None:
    """The image format a file's first bytes announce (``"PNG"``, ``"JPEG"``…), or ``None``."""
    return next((name for magic, name in SIGNATURES.items() if head.startswith(magic)), None)


def _diagnose(data: np.ndarray, decoder_error: str = "") -> str:
    """Why ``data`` (a file's bytes) did not decode, in words a user can act on."""
    if data.size == 0:
        return "the file is empty (0 bytes)"
    head = data[:64].tobytes()
    kind = sniff_format(head)
    if kind is None:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return "not an image (no known image signature at its start)"
        preview = " ".join(text.split())[:24]
        return f"not an image (it holds text: {preview!r}…)"
    detail = f" ({decoder_error})" if decoder_error else ""
    return f"a damaged or truncated {kind} file{detail}"


def _truncated_png(data: np.ndarray) -> bool:
    # A PNG ends with its IEND chunk. Checking first keeps libpng's own complaint (printed
    # straight to stderr, past any logging setting) out of the terminal.
    return sniff_format(data[:8].tobytes()) == "PNG" and data[-1024:].tobytes().find(b"IEND") < 0


def _decode(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)  # works with any path encoding, unlike cv2.imread
    except IsADirectoryError:
        raise ImageReadError(path, "it is a folder, not a file") from None
    except OSError as exc:
        raise ImageReadError(path, exc.strerror or str(exc)) from None
    if data.size == 0 or _truncated_png(data):
        raise ImageReadError(path, _diagnose(data, "it ends before its IEND chunk" if data.size else ""))
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if array is None:  # cv2 gives up on some TIFF variants; Pillow may not
        try:
            with Image.open(path) as im:
                array = np.asarray(im)
                if array.ndim == 3 and array.shape[2] >= 3:
                    array = array[..., [2, 1, 0, *range(3, array.shape[2])]]  # to cv2's BGR(A)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same thing to the user
            reason = str(exc) if not isinstance(exc, UnidentifiedImageError) else ""
            raise ImageReadError(path, _diagnose(data, reason)) from None
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
    raise ImageReadError(path, f"it decodes to shape {array.shape}, not a grey, RGB or RGBA image")


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


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to ``height×width``: area averaging when shrinking both sides (no aliasing), else bilinear."""
    if image.shape[:2] == (height, width):
        return image
    shrink = height < image.shape[0] and width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize; area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if image.shape[:2] == (size, size):
        return image
    shrink = size < min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask_to(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a boolean mask to ``height×width``: area-weighted coverage, then ≥ 0.5."""
    if mask.shape == (height, width):
        return mask
    shrink = height < mask.shape[0] and width < mask.shape[1]
    cover = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cover >= 0.5


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean mask: area-weighted coverage, then ≥ 0.5 (no grown or eroded regions)."""
    if mask.shape == (size, size):
        return mask
    shrink = size < min(mask.shape)
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cover >= 0.5
