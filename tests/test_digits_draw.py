"""detector.data.digits_draw: an image's boxes are the tight boxes of the visible ink; difficult flags."""
from __future__ import annotations

import numpy as np

from detector.data.digits_draw import DigitsParams, compose_image, draw_image, load_digit_images


def test_box_is_tight_box_of_ink_on_flat_background():
    """One opaque digit on black: the box equals the tight box of pixels at >= half the ink colour."""
    images, labels = load_digit_images()
    p = DigitsParams(objects_per_image=(1, 1), opacity=(1.0, 1.0), object_side=(40.0, 80.0))
    for seed in range(5):
        bg = np.zeros((300, 300, 3), np.uint8)
        img, objs = compose_image(np.random.default_rng(seed), bg, images, labels, np.arange(1797), p)
        assert len(objs) == 1 and objs[0]["hidden"] == 0.0 and not objs[0]["difficult"]
        ch = int(np.argmax(img.reshape(-1, 3).max(axis=0)))  # channel carrying the colour
        v = img[:, :, ch].astype(np.float64)
        ink = v >= 0.5 * v.max()
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        ref = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)
        assert np.abs(objs[0]["box"] - ref).max() <= 1.0, (seed, objs[0]["box"], ref)


def test_difficult_marking():
    images, labels = load_digit_images()
    rng = np.random.default_rng(0)
    bg = np.full((320, 320, 3), 100, np.uint8)
    tiny = DigitsParams(object_side=(5.0, 8.0))
    for _ in range(5):
        _, objs = compose_image(rng, bg, images, labels, np.arange(1797), tiny)
        for o in objs:
            side = max(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1])
            assert side < 12 and o["difficult"]
    # larger objects: difficult exactly when more than half of the ink is hidden
    crowded = DigitsParams(object_side=(60.0, 120.0), objects_per_image=(8, 8), max_hidden=0.9,
                           max_box_overlap=1.0)
    seen_hidden = False
    for _ in range(10):
        _, objs = compose_image(rng, bg, images, labels, np.arange(1797), crowded)
        for o in objs:
            assert 0.0 <= o["hidden"] <= 0.9 + 1e-9
            assert o["difficult"] == (o["hidden"] > 0.5)
            seen_hidden |= o["hidden"] > 0.5
        assert objs[-1]["hidden"] == 0.0  # painted last: nothing covers it
    assert seen_hidden


def test_draw_image_is_a_function_of_the_generator():
    images, labels = load_digit_images()
    photos = (("grey", np.full((200, 300, 3), 90, np.uint8)),)
    p = DigitsParams(image_side=(64, 96), object_side=(16.0, 32.0))
    a = draw_image(np.random.default_rng([7, 1, 0]), photos, images, labels, np.arange(1797), p)
    b = draw_image(np.random.default_rng([7, 1, 0]), photos, images, labels, np.arange(1797), p)
    name, img, objs = a
    assert name == "grey" and img.dtype == np.uint8 and 64 <= img.shape[0] <= 96 and 64 <= img.shape[1] <= 96
    assert np.array_equal(img, b[1]) and [o["digit"] for o in objs] == [o["digit"] for o in b[2]]
