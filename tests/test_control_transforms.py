"""ControlNet control images in the data pipeline (diffjax.data.control, the folder's
given control images, make_source's control keywords, the flip of image + control)."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from diffjax.data import (  # noqa: E402
    CONTROLS,
    ControlSource,
    digits_source,
    load_digits_arrays,
    make_control,
    make_dataset,
    make_source,
)
from diffjax.data.folder import FolderSource  # noqa: E402
from diffjax.images import to_uint8  # noqa: E402


def _square(size=16, lo=4, hi=12, value=255, channels=1):
    img = np.zeros((size, size, channels), np.uint8)
    img[lo:hi, lo:hi] = value
    return img


# ----------------------------------------------------------------------------- edges


def test_canny_square_edges_lie_on_its_border_and_equal_cv2():
    img = _square()
    edges = make_control(img, "edges", channels=3)
    assert edges.shape == (16, 16, 3) and edges.dtype == np.float32
    np.testing.assert_array_equal(edges[..., 0], edges[..., 2])
    np.testing.assert_array_equal(edges[..., 0], cv2.Canny(img[..., 0], 100, 200) / 255.0)
    e = edges[..., 0] > 0
    # The step lies between pixels 3|4 and 11|12: every edge pixel touches it ...
    band = np.zeros((16, 16), bool)
    band[3:13, 3:13] = True
    band[5:11, 5:11] = False
    assert e.any() and not (e & ~band).any()
    # ... and the border is closed: each position along each side has its edge on one
    # side of the step or the other.
    for k in range(5, 11):
        assert e[3, k] or e[4, k]  # top
        assert e[11, k] or e[12, k]  # bottom
        assert e[k, 3] or e[k, 4]  # left
        assert e[k, 11] or e[k, 12]  # right
    # A flat image has no edges; an RGB image is given to cv2.Canny as it is.
    assert not make_control(np.full((8, 8, 3), 77, np.uint8), "edges", channels=1).any()
    rgb = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        make_control(rgb, "edges", channels=1, canny_low=50, canny_high=150)[..., 0],
        cv2.Canny(rgb, 50, 150) / 255.0,
    )


# ----------------------------------------------------------------------------- sobel


def test_sobel_of_a_ramp_is_constant_inside_and_flat_gives_zeros():
    x = np.arange(32, dtype=np.uint8) * 8  # 0..248, slope 8
    ramp = np.broadcast_to(x[None, :, None], (20, 32, 1)).copy()
    s = make_control(ramp, "sobel", channels=1)[..., 0]
    # Closed form: Sobel x of a slope a is 8a everywhere inside, 0 in y; divided by the
    # max -> exactly 1 inside; the reflected border columns have zero x gradient.
    np.testing.assert_allclose(s[:, 1:-1], 1.0, atol=1e-7)
    np.testing.assert_allclose(s[:, [0, -1]], 0.0, atol=1e-7)
    # The same ramp along y, in RGB (luminance of equal channels = the channel).
    rgb = np.repeat(np.swapaxes(ramp, 0, 1), 3, axis=-1)
    np.testing.assert_allclose(make_control(rgb, "sobel", channels=3)[1:-1, :, 1], 1.0, atol=1e-7)
    flat = make_control(np.full((8, 8, 3), 200, np.uint8), "sobel", channels=3)
    assert flat.shape == (8, 8, 3) and not flat.any()


# ------------------------------------------------------------------------------ tile


def test_tile_of_constant_checkerboard_and_identity():
    const = np.full((16, 16, 3), 153, np.uint8)
    np.testing.assert_allclose(make_control(const, "tile", channels=3), 0.6, atol=1e-6)
    # A checkerboard finer than the tile averages to exactly half over every tile.
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
    for f in (2, 4, 8):
        np.testing.assert_allclose(
            make_control(checker, "tile", channels=1, tile_factor=f), 0.5, atol=1e-6
        )
    # Factor 1 keeps the image; 1 -> 3 replicates, 3 -> 1 is the luminance.
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    np.testing.assert_allclose(
        make_control(img, "tile", channels=3, tile_factor=1),
        np.repeat(img / 255.0, 3, -1),
        atol=1e-6,
    )
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    luma = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]) / 255.0
    np.testing.assert_allclose(
        make_control(rgb, "tile", channels=1, tile_factor=1)[..., 0], luma, atol=1e-6
    )
    # Coarser than the checkerboard's squares: each half of a two-square image stays put.
    halves = np.zeros((16, 16, 1), np.uint8)
    halves[:, 8:] = 255
    t = make_control(halves, "tile", channels=1, tile_factor=8)
    assert t.shape == (16, 16, 1) and t.min() >= 0.0 and t.max() <= 1.0
    assert t[:, 0].max() < 0.05 and t[:, -1].min() > 0.95


# ------------------------------------------------------------------------------ mask


def test_mask_thresholds_bt601_luminance():
    px = np.asarray([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    # Luminance 0.299, 0.587, 0.114, 1.
    m = make_control(px, "mask", channels=3)
    np.testing.assert_array_equal(m[0, :, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(m[..., 0], m[..., 2])
    np.testing.assert_array_equal(
        make_control(px, "mask", channels=1, mask_threshold=0.25)[0, :, 0], [1, 1, 0, 1]
    )
    gray = np.asarray([[[127], [128], [0], [255]]], np.uint8)  # 127/255 < 0.5 < 128/255
    np.testing.assert_array_equal(make_control(gray, "mask", channels=1)[0, :, 0], [0, 1, 0, 1])


# -------------------------------------------------------------------- batches, determinism


@pytest.mark.parametrize("kind", ["edges", "sobel", "tile", "mask"])
def test_deterministic_and_batched_equals_per_image(kind):
    imgs = np.random.default_rng(3).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    a = make_control(imgs, kind, channels=3)
    b = make_control(imgs, kind, channels=3)
    assert a.shape == (2, 3, 16, 16, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[1, 2], make_control(imgs[1, 2], kind, channels=3))


# ----------------------------------------------------------------------- the sources


@pytest.fixture(scope="module")
def digits_edges():
    return ControlSource(digits_source("train"), "edges", channels=1, canny_low=60)


def test_control_source_on_digits(digits_edges):
    pixels, labels = load_digits_arrays()
    assert len(digits_edges) == len(pixels)
    assert digits_edges.labels is not None and digits_edges.labels.shape == (len(pixels),)
    for i in (0, 7, 1796):
        rec = digits_edges[i]
        assert rec["labels"] == labels[i]
        assert rec["control"].shape == (8, 8, 1) and rec["control"].dtype == np.float32
        assert set(np.unique(rec["control"])) <= {0.0, 1.0}
        np.testing.assert_array_equal(to_uint8(rec["image"]), pixels[i])  # exact round trip
        np.testing.assert_array_equal(
            rec["control"], make_control(pixels[i], "edges", channels=1, canny_low=60)
        )
    assert sum(digits_edges[i]["control"].sum() for i in range(20)) > 0
    assert repr(digits_edges) == repr(
        ControlSource(digits_source("train"), "edges", channels=1, canny_low=60)
    )
    # make_source wraps the source; channels 0 = data.channels.
    src = make_source(
        "digits", image_size=8, channels=1, control="tile", control_options={"channels": 0}
    )
    assert isinstance(src, ControlSource) and src[5]["control"].shape == (8, 8, 1)
    np.testing.assert_allclose(src[5]["control"], pixels[5].mean() / 255.0, atol=1e-6)
    plain = make_source("digits", image_size=8, channels=1, control="")
    assert "control" not in plain[0]


def test_random_flip_flips_control_with_image(digits_edges):
    pixels, _ = load_digits_arrays()
    n = 64
    ds = make_dataset(digits_edges, batch_size=n, seed=0, shuffle=False, random_flip=True)
    batch = next(iter(ds))
    flipped = kept = 0
    for i in range(n):
        image, control = batch["image"][i], batch["control"][i]
        ref = digits_edges[i]
        mirror = pixels[i][:, ::-1]
        if np.array_equal(pixels[i], mirror):
            continue  # symmetric: cannot tell
        if np.array_equal(to_uint8(image), mirror):
            flipped += 1
            np.testing.assert_array_equal(control, ref["control"][:, ::-1])
        else:
            kept += 1
            np.testing.assert_array_equal(to_uint8(image), pixels[i])
            np.testing.assert_array_equal(control, ref["control"])
    assert flipped > 10 and kept > 10


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_given_control_images(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "data"
    images, controls = {}, {}
    for name in ("a", "b", "c"):
        images[name] = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # h=8, w=12
        controls[name] = rng.integers(0, 256, (8, 12), dtype=np.uint8)
        _png(str(root / "images" / f"{name}.png"), images[name])
    _png(str(root / "control" / "a.png"), controls["a"])
    _png(str(root / "control" / "b.png"), controls["b"])
    Image.fromarray(controls["c"]).save(str(root / "control" / "c.bmp"))  # any extension
    (root / "images" / "a.txt").write_text("a red square")

    src = make_source(
        "folder",
        data_dir=str(root),
        image_size=8,
        channels=3,
        control="given",
        control_options={"channels": 1, "canny_low": 1},
    )
    assert isinstance(src, FolderSource) and len(src) == 3 and src.class_names == []
    assert [os.path.basename(p) for p in src.control_paths] == ["a.png", "b.png", "c.bmp"]
    for i, name in enumerate("abc"):
        rec = src[i]
        # 12x8 with shorter side 8: only the centre crop (columns 2..9), on both.
        np.testing.assert_array_equal(to_uint8(rec["image"]), images[name][:, 2:10])
        assert rec["control"].shape == (8, 8, 1) and rec["control"].dtype == np.float32
        np.testing.assert_allclose(rec["control"][..., 0], controls[name][:, 2:10] / 255.0)
    assert "context" in src[0] and src.caption(0) == "a red square"

    # A control at twice the size (same aspect) is resized to its image first: a step at
    # the middle stays at the middle of the crop.
    step = np.zeros((16, 24), np.uint8)
    step[:, 12:] = 255
    _png(str(root / "control" / "b.png"), step)
    ctrl = src[1]["control"][..., 0]
    assert ctrl[:, :3].max() < 0.1 and ctrl[:, 5:].min() > 0.9
    _png(str(root / "control" / "b.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        src[1]

    # A missing control file fails at start-up, naming it and the layout.
    os.remove(str(root / "control" / "c.bmp"))
    with pytest.raises(FileNotFoundError, match=r"c\.png.*ROOT/control/NAME\.png"):
        FolderSource(str(root), image_size=8, channels=3, control_channels=3)
    # Without control/ at all; and a source other than a folder.
    with pytest.raises(FileNotFoundError, match="ROOT/images/NAME.png"):
        FolderSource(str(root / "images"), image_size=8, channels=3, control_channels=3)
    with pytest.raises(ValueError, match="data.source='folder'"):
        make_source("digits", image_size=8, channels=1, control="given")


# -------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(monkeypatch):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="choose one of .*'edges'"):
        make_control(img, "depth", channels=3)
    with pytest.raises(ValueError, match="ROOT/control/NAME.png"):
        make_control(img, "given", channels=3)
    with pytest.raises(ValueError, match="uint8.*to_uint8"):
        make_control(img.astype(np.float32), "edges", channels=3)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        make_control(img, "edges", channels=2)
    with pytest.raises(ValueError, match="trailing channel axis"):
        make_control(img[..., 0], "edges", channels=1)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_control(np.zeros((8, 8, 4), np.uint8), "mask", channels=1)
    with pytest.raises(ValueError, match="tile_factor=3 does not divide"):
        make_control(img, "tile", channels=3, tile_factor=3)
    with pytest.raises(ValueError, match="mask_threshold"):
        make_control(img, "mask", channels=3, mask_threshold=1.5)
    with pytest.raises(TypeError, match="Unknown control option"):
        ControlSource(digits_source("half0"), "edges", channels=1, low=3)
    with pytest.raises(ValueError, match="tile_factor=3 does not divide"):  # at start-up
        make_source(
            "digits", image_size=8, channels=1, control="tile", control_options={"tile_factor": 3}
        )
    with pytest.raises(ValueError, match="Unknown controlnet.control"):
        make_source("digits", image_size=8, channels=1, control="canny")
    assert CONTROLS == ("edges", "sobel", "tile", "mask", "given")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        make_control(img, "edges", channels=3)
    make_control(img, "mask", channels=3)  # needs no OpenCV
