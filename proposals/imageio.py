"""Image reading and normalisation to 8-bit RGB, shared by proposals and the detector.

Shape shorthand (used across the project):
    H x W: image height and width in pixels

Every image entering the proposal or detection code goes through :func:`to_rgb_uint8`, so
grayscale, single-channel, RGBA, 16-bit and float images all become ``uint8 [H, W, 3]`` RGB.
:func:`read_image` reads a file (OpenCV first, PIL as a fallback) and rejects files that cannot be
used with an :class:`ImageError` naming the file and the problem.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["ImageError", "to_rgb_uint8", "pil_to_rgb", "read_image", "decode_image", "MIN_IMAGE_SIDE",
           "MAX_IMAGE_SIDE"]

log = logging.getLogger(__name__)

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


def pil_to_rgb(image, name: str = "<PIL image>") -> np.ndarray:
    """A PIL image of any mode as ``uint8 [H, W, 3]`` RGB.

    Palette ("P", "PA"), CMYK, YCbCr, LAB, HSV, grey-with-alpha and the RGB variants are converted
    by PIL's own colour conversion (alpha dropped, not composited); 16-bit grey ("I;16*", and "I"
    with values in 0..65535) keeps its top 8 bits as :func:`to_rgb_uint8` does; bilevel ("1")
    becomes 0/255. A floating-point image ("F") has no defined pixel range and is refused by name.

    Raises:
        ImageError: mode "F", or "I" with values outside 0..65535 (the mode is named).
    """
    mode = image.mode
    if mode in ("RGB", "L"):
        return to_rgb_uint8(np.asarray(image), name=name)
    if mode == "1":
        return to_rgb_uint8(np.asarray(image.convert("L")), name=name)
    if mode.startswith("I;16"):
        return to_rgb_uint8(np.asarray(image).astype(np.uint16), name=name)
    if mode == "I":
        a = np.asarray(image)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ImageError(f"{name}: integer image (PIL mode 'I': 32-bit or signed) with values outside "
                             f"0..65535; convert it to 8 or 16 bits first")
        return to_rgb_uint8(a.astype(np.uint16), name=name)
    if mode == "F":
        raise ImageError(f"{name}: floating-point image (PIL mode 'F') has no defined pixel range; convert it "
                         f"to 'L' or 'RGB' first")
    try:
        return to_rgb_uint8(np.asarray(image.convert("RGB")), name=name)
    except ValueError:  # a mode PIL converts only through another ("La" -> "LA")
        try:
            return to_rgb_uint8(np.asarray(image.convert(mode.upper()).convert("RGB")), name=name)
        except ValueError as e:
            raise ImageError(f"{name}: PIL cannot convert an image of mode {mode!r} to RGB ({e})") from None


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
# PIL modes of files whose colours OpenCV gets wrong: PIL reads them. A CIELab TIFF of a test image
# came out 17 levels per channel from the original on average through OpenCV, 3.6 through PIL.
_PIL_COLOUR_SPACES = ("LAB",)


def _colour_space_for_pil(p: Path, data: np.ndarray) -> bool:
    """True for a TIFF whose colour space OpenCV misreads (PIL reads only its header here)."""
    if bytes(data[:4]) not in _TIFF_MAGIC:
        return False
    from PIL import Image

    try:
        with Image.open(p) as im:
            return im.mode in _PIL_COLOUR_SPACES
    except Exception:  # noqa: BLE001 - not PIL's to read: OpenCV tries, and the error names the file
        return False


def decode_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE,
                 max_side: int = MAX_IMAGE_SIDE) -> tuple[np.ndarray, str | None]:
    """:func:`read_image` that also says what was wrong with a file it could still decode.

    Returns:
        (image uint8 [H, W, 3] RGB, warning): the warning names the file and the problem (a
        truncated JPEG decoded with its missing rows grey), or is None.
    Raises:
        ImageError: as :func:`read_image`.
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: file is empty (0 bytes)")
    data = np.fromfile(str(p), dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    img = None if _colour_space_for_pil(p, data) else cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is not None and img.dtype.kind in "iu" and img.dtype not in (np.uint8, np.uint16):
        img = None  # 32-bit or signed integers (a TIFF): PIL reads them as mode "I", range checked
    warning = None
    if img is not None:
        if img.ndim == 3 and img.shape[2] == 3:
            img = img[:, :, ::-1]  # BGR -> RGB
        elif img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
        img = to_rgb_uint8(img, name=str(p))
    else:
        from PIL import Image, ImageFile

        try:
            with Image.open(p) as im:
                try:
                    img = pil_to_rgb(im, name=str(p))
                except OSError as e:
                    if "truncated" not in str(e):
                        raise
                    # what can be decoded of a cut-off file: PIL fills the missing rows with grey
                    old = ImageFile.LOAD_TRUNCATED_IMAGES
                    ImageFile.LOAD_TRUNCATED_IMAGES = True
                    try:
                        with Image.open(p) as im2:
                            img = pil_to_rgb(im2, name=str(p))
                    finally:
                        ImageFile.LOAD_TRUNCATED_IMAGES = old
                    warning = f"{p}: {e}; decoded what the file holds (the missing part is grey)"
        except ImageError:
            raise
        except Exception as e:  # PIL raises many types for corrupt files
            raise ImageError(f"{p}: cannot decode image ({type(e).__name__}: {e})") from None
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(f"{p}: image is {w}x{h} px, smaller than {min_side} px on a side")
    if max(h, w) > max_side:
        raise ImageError(f"{p}: image is {w}x{h} px, larger than {max_side} px on a side "
                         f"(resize it first)")
    return img, warning


def read_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE,
               max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB.

    OpenCV reads the file (``IMREAD_UNCHANGED``, so 16-bit and alpha are seen and normalised by
    :func:`to_rgb_uint8`); PIL reads what OpenCV cannot decode, a CIELab TIFF (whose colours
    OpenCV gets wrong) and 32-bit or signed integer pixels (range-checked as an in-memory PIL
    image of mode "I" is); any PIL mode is converted by :func:`pil_to_rgb`. A truncated file is
    decoded as far as it goes, with one warning naming it. EXIF orientation is not applied (the
    annotation tools of VOC-style data sets use the stored pixel order).

    Args:
        path: image file.
        min_side, max_side: allowed range of each side in pixels.
    Returns:
        ndarray uint8 [H, W, 3] RGB.
    Raises:
        ImageError: missing, empty (0 bytes) or undecodable file, or a side outside
            ``[min_side, max_side]``; the message names the file and the problem.
    """
    img, warning = decode_image(path, min_side, max_side)
    if warning:
        log.warning("%s", warning)
    return img
