"""diffjax.images: the one list of image extensions, decoding into model space, grids."""

import numpy as np
import pytest
from PIL import Image

from diffjax import images
from diffjax.data import folder
from diffjax.eval import fid


def test_one_extension_list_for_every_reader_and_pillow_reads_it():
    # The folder source's former list and pytorch-fid's are both covered.
    old_folder = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    pytorch_fid = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
    assert set(images.IMAGE_EXTENSIONS) == old_folder | pytorch_fid
    assert fid.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS
    assert folder.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS
    readable = Image.registered_extensions()
    assert all(ext in readable for ext in images.IMAGE_EXTENSIONS)
    assert images.is_image_file("a/B.TIFF") and images.is_image_file("x.ppm")
    assert not images.is_image_file(".hidden.png") and not images.is_image_file("notes.txt")


@pytest.mark.parametrize("ext", images.IMAGE_EXTENSIONS)
def test_every_extension_decodes_through_prepare_image(tmp_path, ext):
    pixels = np.full((6, 4, 3), 200, np.uint8)
    path = tmp_path / f"a{ext}"
    img = Image.fromarray(pixels[..., 0] if ext == ".pgm" else pixels)
    # webp and jpeg are lossy; flat colours survive them closely, not exactly.
    img.save(path, **({"lossless": True} if ext == ".webp" else {}))
    with Image.open(path) as f:
        got = images.prepare_image(f, image_size=4, channels=3)
    assert got.shape == (4, 4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(
        got, images.uint8_to_float(np.full((4, 4, 3), 200, np.uint8)), atol=0.02
    )


def test_resize_center_crop_and_modes_closed_forms():
    wide = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10)
    crop = images.resize_center_crop(Image.fromarray(wide), 6)  # only cropped: offset 2
    np.testing.assert_array_equal(np.asarray(crop), wide[:, 2:8])
    transparent = Image.fromarray(np.zeros((2, 2, 4), np.uint8))
    np.testing.assert_array_equal(np.asarray(images.to_mode(transparent, 3)), 255)
    sixteen = Image.fromarray(np.full((2, 2), 257 * 51, np.uint16))
    np.testing.assert_array_equal(np.asarray(images.to_mode(sixteen, 1)), 51)
    with pytest.raises(ValueError, match="channels=2"):
        images.to_mode(transparent, 2)


def test_uint8_float_round_trip():
    v = np.arange(256, dtype=np.uint8)
    f = images.uint8_to_float(v.reshape(16, 16))
    assert f.shape == (16, 16, 1) and f.dtype == np.float32
    assert f.min() == -1.0 and f.max() == 1.0
    np.testing.assert_array_equal(images.to_uint8(f)[..., 0], v.reshape(16, 16))
    batch = images.uint8_to_float(np.zeros((2, 3, 3, 1), np.uint8))
    assert batch.shape == (2, 3, 3, 1)


def test_grid_tiles_enlarges_and_saves(tmp_path):
    tiles = np.stack([np.full((8, 8, 1), 10 * i, np.uint8) for i in range(5)])
    grid = images.make_grid(tiles, ncols=3, min_tile=16)  # 8 px tiles doubled to 16
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1, 1)
    np.testing.assert_array_equal(grid[1:17, 18:34], 10)
    assert (grid[18:34, 35:51] == 255).all()  # the empty sixth cell stays white
    with pytest.raises(ValueError, match="uint8"):
        images.make_grid(tiles.astype(np.float32))
    path = images.save_grid(tiles, str(tmp_path / "sub" / "g.png"))
    with Image.open(path) as f:  # default: 3 columns of 32 px tiles, 1 px gaps
        assert f.mode == "L" and f.size == (3 * 33 + 1, 2 * 33 + 1)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["g.png"]
