"""Image input (proposals.imageio): every PIL mode converted by PIL's own colour conversion or
refused by name; a truncated file decoded as far as it goes, with a warning naming it."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from proposals.imageio import ImageError, decode_image, pil_to_rgb, read_image


@pytest.fixture()
def rgb() -> np.ndarray:
    g = np.random.default_rng(0)
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32] = (200, 40, 10)  # flat colours survive palette quantisation exactly
    img[:, 32:] = (10, 160, 220)
    img[20:30] = g.integers(0, 255, (10, 64, 3), dtype=np.uint8)
    return img


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "LA", "RGBA", "RGBX", "La", "RGBa"])
def test_colour_modes_go_through_pils_conversion(rgb, mode):
    im = Image.fromarray(rgb).convert(mode)
    got = pil_to_rgb(im)
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
    via = im.convert("RGB") if mode != "La" else im.convert("LA").convert("RGB")  # La only converts via LA
    np.testing.assert_array_equal(got, np.asarray(via))


def test_cmyk_and_palette_are_not_misread(rgb):
    """Taken as arrays, a CMYK image would be read as RGBA and a palette image as grey indices."""
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(pil_to_rgb(cmyk).astype(int) - rgb.astype(int)).mean() < 3
    assert np.abs(np.asarray(cmyk)[..., :3].astype(int) - rgb.astype(int)).mean() > 50
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    got = pil_to_rgb(pal)
    assert np.abs(got.astype(int) - rgb.astype(int))[:20].mean() < 8  # the palette's colours, not grey indices
    assert not np.array_equal(got[..., 0], got[..., 1])


def test_grey_bilevel_and_16_bit(rgb):
    grey = Image.fromarray(rgb[..., 0])
    np.testing.assert_array_equal(pil_to_rgb(grey), np.repeat(rgb[..., :1], 3, axis=2))
    bw = Image.fromarray(rgb[..., 0] > 100)
    assert set(np.unique(pil_to_rgb(bw))) <= {0, 255}
    v16 = rgb[..., 0].astype(np.uint16) * 257
    for im in (Image.fromarray(v16), Image.fromarray(v16.astype(np.int32), mode="I")):
        np.testing.assert_array_equal(pil_to_rgb(im)[..., 0], rgb[..., 0])  # top 8 bits


def test_float_and_out_of_range_integer_images_are_refused_by_name(rgb):
    with pytest.raises(ImageError, match="mode 'F'"):
        pil_to_rgb(Image.fromarray(rgb[..., 0].astype(np.float32)), name="x.tif")
    with pytest.raises(ImageError, match="x.png.*0..65535"):
        pil_to_rgb(Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I"), name="x.png")


def test_a_truncated_jpeg_is_decoded_with_a_warning_naming_it(rgb, tmp_path, caplog):
    path = tmp_path / "cut.jpg"
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    path.write_bytes(jpg.tobytes()[:-20])
    img, warning = decode_image(path)
    assert img.shape == (48, 64, 3) and "cut.jpg" in warning and "truncated" in warning
    with caplog.at_level(logging.WARNING):
        assert read_image(path).shape == (48, 64, 3)
    assert "cut.jpg" in caplog.text
    full = tmp_path / "full.jpg"
    full.write_bytes(jpg.tobytes())
    assert decode_image(full)[1] is None
    path.write_bytes(jpg.tobytes()[:200])  # the header and little else: nothing to decode
    with pytest.raises(ImageError, match="cut.jpg"):
        decode_image(path)
    path.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageError, match="cut.jpg"):
        decode_image(path)
