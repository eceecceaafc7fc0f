"""Any image to the RGB888 bitmap the models take: one rule for the trainer, the client and the camera.

Most machine-vision cameras are monochrome. Gray pixels are brought to 8 bits and replicated to
R = G = B; nothing else changes (no stretching per image, which would move a defect's contrast
from one image to the next).

- 8-bit gray (Pillow "L"), gray with alpha ("LA"), palette ("P"), 1-bit ("1"), RGB with alpha:
  Pillow's own conversion (alpha dropped, palette looked up, R = G = B for gray).
- 16-bit gray ("I;16", "I;16L", "I;16B", "I;16N", and "I", as which some Pillow versions open
  16-bit PNGs): full scale is 0…65535 and the 8 most significant bits are kept, ``value >> 8``
  (values of an "I" image outside 0…65535 are clipped first). Pillow's ``convert("RGB")`` would
  clip every value above 255 to white instead.
- Gray of ``bits`` significant bits in 16-bit words, least significant bits first (camera formats
  such as FFmpeg's gray10le and gray12le): ``value >> (bits - 8)``. Data of a 12-bit sensor
  written into a 16-bit file or array without that knowledge reads as 16-bit: it comes out dark,
  so shift it left (``<< 4``) before, or write the file with the full 16-bit scale.
- 32-bit floating-point images ("F") are refused: there is no scale to assume.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIXTEEN_BIT_MODES", "gray_to_rgb888", "gray_to_uint8", "to_rgb888"]

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def gray_to_uint8(values: np.ndarray, bits: int = 8) -> np.ndarray:
    """[H, W] (or [H, W, 1]) integer gray values with `bits` significant bits -> [H, W] uint8."""
    if not 8 <= bits <= 16:
        raise ValueError(f"gray images have 8 to 16 bits per pixel, not {bits}")
    gray = values[..., 0] if values.ndim == 3 and values.shape[2] == 1 else values
    if gray.ndim != 2 or not np.issubdtype(gray.dtype, np.integer):
        raise ValueError(
            f"expected [H, W] integer gray values, got shape {values.shape} and dtype {values.dtype}"
        )
    if gray.dtype == np.uint8 and bits == 8:
        return gray
    if not (gray.dtype == np.uint16 and bits == 16):  # other types may hold values beyond `bits`
        gray = np.clip(gray, 0, (1 << bits) - 1)
    return (gray >> (bits - 8)).astype(np.uint8)


def gray_to_rgb888(values: np.ndarray, bits: int = 8) -> np.ndarray:
    """[H, W] (or [H, W, 1]) gray values with `bits` significant bits -> [H, W, 3] uint8, R = G = B."""
    return np.repeat(gray_to_uint8(values, bits)[:, :, None], 3, axis=2)


def to_rgb888(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB from a Pillow image of any mode, or from an array.

    Arrays may be [H, W, 3] uint8 (RGB, returned as they are), [H, W] or [H, W, 1] uint8 (gray)
    or uint16 (16-bit gray, full scale). ValueError for anything else, saying what was given.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb888(image)
    if image.mode in SIXTEEN_BIT_MODES:
        return gray_to_rgb888(np.asarray(image), 16)
    if image.mode == "F":
        raise ValueError("32-bit floating-point images are not supported: save the image as 8-bit or 16-bit")
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise ValueError(f"a {image.mode} image cannot be converted to RGB: {exc}") from None


def _array_to_rgb888(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    gray = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1)
    if gray and array.dtype.kind == "u" and array.dtype.itemsize in (1, 2):  # either byte order
        return gray_to_rgb888(array, 8 * array.dtype.itemsize)
    raise ValueError(
        "expected an [H, W, 3] uint8 RGB array or an [H, W] uint8 or uint16 gray array, "
        f"got shape {array.shape} and dtype {array.dtype}"
    )
