"""Image reading and normalisation to 8-bit RGB, shared by proposals and the detector.

Shape shorthand (used across the project):
    H x W: image height and width in pixels

Every image entering the proposal or detection code goes through :func:`to_rgb_uint8`, so
grayscale, single-channel, RGBA, 16-bit and float images all become ``uint8 [H, W, 3]`` RGB.
:func:`read_image` reads a file (OpenCV first, PIL as a fallback) and rejects files that cannot be
used with an :class:`ImageError` naming the file and the problem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ImageError", "to_rgb_uint8", "read_image", "MIN_IMAGE_SIDE", "MAX_IMAGE_SIDE"]

MIN_IMAGE_SIDE = 32  # px; smaller images cannot hold a min_size=20 proposal with any context
MAX_IMAGE_SIDE = 10000  # px; larger files are almost certainly not photos meant for detection


class ImageError(ValueError):
    """An image that cannot be used (unreadable, empty, too small or too large, odd dtype)."""


def to_rgb_uint8(image: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Normalise an image array to ``uint8 [H, W, 3]`` RGB.

    Accepted inputs (channel order is taken to be RGB / RGBA already):
        * ``[H, W]`` or ``[H, W, 1]`` grayscale -> replicated to 3 channels;
        * ``[H, W, 3]`` RGB;
        * ``[H, W, 4]`` RGBA -> alpha dropped (not composited);
        * dtype uint8 (as is), uint16 (``>> 8``, i.e. 0..65535 -> 0..255), bool (0/255),
          float in [0, 1] (``* 255``, rounded; values outside are clipped, see below).

    Args:
        image: the array.
        name: what to call it in error messages (a file name).
    Returns:
        ndarray uint8 [H, W, 3], C-contiguous (a new array unless the input already fits).
    Raises:
        ImageError: wrong number of dimensions or channels, empty, unsupported dtype, or a float
            image with values clearly outside [0, 1] (e.g. 0..255 floats: convert them yourself).
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W, 1)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{name}: empty image of shape {tuple(image.shape)}")
    if image.dtype == np.uint8:
        out = image
    elif image.dtype == np.uint16:
        out = (image >> 8).astype(np.uint8)
    elif image.dtype == np.bool_:
        out = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        if lo < -0.01 or hi > 1.01 or not np.isfinite(image).all():
            raise ImageError(f"{name}: float image must be finite and in [0, 1], got range "
                             f"[{lo:g}, {hi:g}] (divide 0..255 floats by 255 first)")
        out = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported dtype {image.dtype} (use uint8, uint16 or float in [0, 1])")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)  # (H, W, 3)
    elif out.shape[2] == 4:
        out = out[:, :, :3]  # (H, W, 3) alpha dropped
    return np.ascontiguousarray(out)


def read_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE,
               max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB.

    OpenCV reads the file (``IMREAD_UNCHANGED``, so 16-bit and alpha are seen and normalised by
    :func:`to_rgb_uint8`); PIL is tried when OpenCV cannot decode it. EXIF orientation is not applied
    (the annotation tools of VOC-style data sets use the stored pixel order).

    Args:
        path: image file.
        min_side, max_side: allowed range of each side in pixels.
    Returns:
        ndarray uint8 [H, W, 3] RGB.
    Raises:
        ImageError: missing, empty (0 bytes) or undecodable file, or a side outside
            ``[min_side, max_side]``; the message names the file and the problem.
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: file is empty (0 bytes)")
    data = np.fromfile(str(p), dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is not None:
        if img.ndim == 3 and img.shape[2] == 3:
            img = img[:, :, ::-1]  # BGR -> RGB
        elif img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
    else:
        try:
            from PIL import Image

            with Image.open(p) as im:
                im = im.convert("RGB") if im.mode not in ("L", "I;16", "RGB", "RGBA") else im
                img = np.asarray(im)
        except Exception as e:  # PIL raises many types for corrupt files
            raise ImageError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(f"{p}: image is {w}x{h} px, smaller than {min_side} px on a side")
    if max(h, w) > max_side:
        raise ImageError(f"{p}: image is {w}x{h} px, larger than {max_side} px on a side "
                         f"(resize it first)")
    return to_rgb_uint8(img, name=str(p))
