"""Real dataset sources: tfds (ArrayRecord), image folders, latents, captions."""

import logging
import pickle
import zipfile
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffjax import data
from diffjax.data import captions, folder
from diffjax.images import IMAGE_EXTENSIONS, prepare_image

# ----------------------------------------------------------------------------- tfds

_TFDS_TRAIN, _TFDS_TEST = 10, 4


def _unit(v) -> np.ndarray:
    """uint8 value(s) -> float32 in [-1, 1], in float32 arithmetic like the sources."""
    return np.asarray(v, np.float32) / np.float32(127.5) - np.float32(1.0)


def _tiny_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return images, (np.arange(n) % 3).astype(np.int64)


class DiffjaxTestImages(tfds.core.GeneratorBasedBuilder):
    """A 6x6 RGB, 3-class dataset written by the test; registered as 'diffjax_test_images'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 6, 3)),
                    "label": tfds.features.ClassLabel(names=["ant", "bee", "cat"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(_TFDS_TRAIN, 0),
            "test": self._generate_examples(_TFDS_TEST, 1),
        }

    def _generate_examples(self, n, seed):
        images, labels = _tiny_images(n, seed)
        for i in range(n):
            # Encoding an Image feature from numpy needs TensorFlow; a PIL image does not.
            yield i, {"image": Image.fromarray(images[i]), "label": int(labels[i])}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    DiffjaxTestImages(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def _tfds(tfds_dir, **kwargs):
    args = dict(name="diffjax_test_images", data_dir=tfds_dir, image_size=6, channels=3)
    args.update(kwargs)
    return data.make_source("tfds", **args)


def test_tfds_array_record_round_trips_pixels_and_labels_exactly(tfds_dir):
    src = _tfds(tfds_dir, split="train", num_classes=3, random_flip=False, worker_count=0)
    assert len(src) == _TFDS_TRAIN and src.num_classes == 3
    assert src.class_names == ["ant", "bee", "cat"]
    images, labels = _tiny_images(_TFDS_TRAIN, 0)
    expected = _unit(images)
    matched = set()
    # tfds shuffles records when writing, so match each record to its image by content.
    for i in range(len(src)):
        rec = src[i]
        assert rec["image"].dtype == np.float32 and rec["image"].shape == (6, 6, 3)
        assert rec["labels"].dtype == np.int32
        hits = [j for j in range(_TFDS_TRAIN) if np.array_equal(rec["image"], expected[j])]
        assert len(hits) == 1
        assert rec["labels"] == labels[hits[0]]
        matched.add(hits[0])
    assert matched == set(range(_TFDS_TRAIN))
    assert len(_tfds(tfds_dir, split="test")) == _TFDS_TEST
    assert len(_tfds(tfds_dir, split="train[:50%]")) == _TFDS_TRAIN // 2


def test_tfds_resizes_and_converts_channels(tfds_dir):
    full = _tfds(tfds_dir)
    small = _tfds(tfds_dir, image_size=4, channels=1)
    rec = small[0]
    assert rec["image"].shape == (4, 4, 1)
    pixels = np.round((full[0]["image"] + 1) * 127.5).astype(np.uint8)
    want = prepare_image(Image.fromarray(pixels), image_size=4, channels=1)
    np.testing.assert_array_equal(rec["image"], want)


def test_tfds_repr_is_stable_and_iterator_resumes(tfds_dir):
    src = _tfds(tfds_dir)
    again = _tfds(tfds_dir)
    assert repr(src) == repr(again)
    assert "diffjax_test_images" in repr(src) and "'train'" in repr(src) and "n=10" in repr(src)
    assert "0x" not in repr(src)
    it = data.make_iterator(src, batch_size=3, seed=5)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (10 records)
    resumed = data.make_iterator(again, batch_size=3, seed=5)
    resumed.set_state(state)
    for e in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], e["image"])
        np.testing.assert_array_equal(got["labels"], e["labels"])
    # Grain workers (worker_count > 0) receive a pickled copy of the source.
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[3]["image"], src[3]["image"])


def test_tfds_missing_dataset_names_it_the_dir_and_the_fix(tmp_path):
    empty = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError) as e:
        data.make_source("tfds", name="cifar10", data_dir=empty, image_size=32, channels=3)
    msg = str(e.value)
    assert "'cifar10'" in msg and empty in msg
    assert "tfds build cifar10 --file_format=array_record" in msg
    with pytest.raises(FileNotFoundError, match="manual_dir"):
        data.make_source("tfds", name="imagenet2012", data_dir=empty, image_size=64, channels=3)
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        data.make_source(
            "tfds", name="no_such_dataset_xyz", data_dir=empty, image_size=8, channels=1
        )
    # Nothing was downloaded or created.
    assert not (tmp_path / "empty").exists()


def test_tfds_bad_split_and_class_count(tfds_dir):
    with pytest.raises(ValueError, match="data.split"):
        _tfds(tfds_dir, split="validation")
    with pytest.raises(ValueError, match="data.num_classes=3"):
        _tfds(tfds_dir, num_classes=2)


# ----------------------------------------------------------------------------- folder


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_class_dirs_labels_and_exact_center_crop(tmp_path):
    # W=10, H=6: no resize for image_size=6, crop columns 2..7; R = column, G = row.
    wide = np.zeros((6, 10, 3), np.uint8)
    wide[..., 0] = np.arange(10)[None, :] * 20
    wide[..., 1] = np.arange(6)[:, None] * 30
    wide[..., 2] = 7
    _save(tmp_path / "b_dogs" / "x.png", wide)
    _save(tmp_path / "a_cats" / "sub" / "y.png", np.full((6, 6, 3), 9, np.uint8))
    _save(tmp_path / "a_cats" / "z.bmp", np.full((12, 6, 3), 200, np.uint8))
    (tmp_path / "a_cats" / "notes.md").write_text("not an image")
    src = data.make_source("folder", data_dir=str(tmp_path), image_size=6, channels=3)
    assert src.class_names == ["a_cats", "b_dogs"]
    assert [p.rsplit("/", 2)[-2:] for p in src.paths] == [
        ["sub", "y.png"],
        ["a_cats", "z.bmp"],
        ["b_dogs", "x.png"],
    ]
    np.testing.assert_array_equal(src.labels, [0, 0, 1])
    rec = src[2]
    assert rec["labels"] == 1 and rec["labels"].dtype == np.int32
    assert set(rec) == {"image", "labels"}
    np.testing.assert_array_equal(rec["image"], _unit(wide[:, 2:8]))
    assert "0x" not in repr(src) and repr(src) == repr(
        data.make_source("folder", data_dir=str(tmp_path), image_size=6, channels=3)
    )
    # The 6-wide, 12-tall flat image is only cropped at size 6; at size 3 it is resized
    # (to 3 x 6) and a flat colour must survive the bicubic filter exactly.
    small = data.make_source("folder", data_dir=str(tmp_path), image_size=3, channels=3)
    np.testing.assert_array_equal(small[1]["image"], np.full((3, 3, 3), _unit(200)))


def test_folder_resize_is_bicubic_of_the_shorter_side(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H=20, W=30
    _save(tmp_path / "a.png", img)
    src = folder.FolderSource(str(tmp_path), image_size=8, channels=3)
    # Shorter side 20 -> 8, so 30 -> 12; then the centre 8 columns (offset 2).
    want = np.asarray(Image.fromarray(img).resize((12, 8), Image.Resampling.BICUBIC))[:, 2:10]
    np.testing.assert_array_equal(src[0]["image"], _unit(want))
    assert src.labels is None and set(src[0]) == {"image"}


def test_folder_channel_conversion_closed_forms(tmp_path):
    _save(tmp_path / "red.png", np.tile(np.array([255, 0, 0], np.uint8), (4, 4, 1)))
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white
    _save(tmp_path / "transparent.png", rgba)
    _save(tmp_path / "gray.png", np.full((4, 4), 51, np.uint8))
    gray = folder.FolderSource(str(tmp_path), image_size=4, channels=1)
    rgb = folder.FolderSource(str(tmp_path), image_size=4, channels=3)
    names = [p.rsplit("/", 1)[-1] for p in gray.paths]
    assert names == ["gray.png", "red.png", "transparent.png"]
    # ITU-R 601-2 luma: L = 0.299 R + 0.587 G + 0.114 B -> 255 * 0.299 = 76.2 -> 76.
    np.testing.assert_array_equal(gray[1]["image"], np.full((4, 4, 1), _unit(76)))
    np.testing.assert_array_equal(rgb[0]["image"], np.full((4, 4, 3), _unit(51)))
    np.testing.assert_array_equal(rgb[2]["image"], np.ones((4, 4, 3), np.float32))


def test_folder_corrupt_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # big enough to truncate
    for name in ("a.png", "c.jpg"):
        _save(tmp_path / name, noise)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    for good, bad in (("a.png", "d.png"), ("c.jpg", "e.jpg")):
        raw = (tmp_path / good).read_bytes()
        (tmp_path / bad).write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(ValueError, match=r"b\.png.*skip_corrupt"):
        data.make_source("folder", data_dir=str(tmp_path), image_size=4, channels=3)
    with caplog.at_level(logging.WARNING):
        src = data.make_source(
            "folder", data_dir=str(tmp_path), image_size=4, channels=3, skip_corrupt=True
        )
    # The truncated JPEG passes Image.verify(); skip_corrupt's full decode catches it.
    assert src.num_skipped == 3 and len(src) == 2
    assert [p.rsplit("/", 1)[-1] for p in src.skipped] == ["b.png", "d.png", "e.jpg"]
    assert [p.rsplit("/", 1)[-1] for p in src.paths] == ["a.png", "c.jpg"]
    assert "Skipped 3 unreadable" in caplog.text
    assert "n=2" in repr(src)
    # Without skip_corrupt, a JPEG that passes verify() but cannot be decoded fails
    # when read, naming the file.
    for name in ("b.png", "d.png"):
        (tmp_path / name).unlink()
    lazy = folder.FolderSource(str(tmp_path), image_size=4, channels=3)
    assert len(lazy) == 3
    with pytest.raises(ValueError, match=r"e\.jpg.*skip_corrupt"):
        lazy[2]


def test_folder_reads_every_image_extension(tmp_path):
    # One list (diffjax.IMAGE_EXTENSIONS) for the folder source and FID.
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        pixels = np.full((4, 4, 3), 128, np.uint8)
        img = Image.fromarray(pixels[..., 0] if ext == ".pgm" else pixels)
        img.save(tmp_path / f"{i}{ext.upper() if i % 2 else ext}")
    (tmp_path / "5.gif").write_bytes(b"GIF89a")  # not in the list: ignored
    src = data.make_source("folder", data_dir=str(tmp_path), image_size=4, channels=1)
    assert len(src) == len(IMAGE_EXTENSIONS)


def test_folder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_source("folder", data_dir=str(tmp_path / "nope"), image_size=4, channels=3)
    with pytest.raises(ValueError, match="No images"):
        data.make_source("folder", data_dir=str(tmp_path), image_size=4, channels=3)
    _save(tmp_path / "k1" / "a.png", np.zeros((4, 4, 3), np.uint8))
    _save(tmp_path / "k2" / "a.png", np.zeros((4, 4, 3), np.uint8))
    for wrong in (1, 10):  # more folders than classes, and classes with no folder
        with pytest.raises(ValueError, match="has 2 class folders .* set data.num_classes=2"):
            data.make_source(
                "folder", data_dir=str(tmp_path), image_size=4, channels=3, num_classes=wrong
            )
    _save(tmp_path / "loose.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="loose.png"):
        data.make_source("folder", data_dir=str(tmp_path), image_size=4, channels=3)
    flat = tmp_path / "k1"  # images only: unlabelled, so a class-conditional config fails
    with pytest.raises(ValueError, match="data.num_classes=0"):
        data.make_source("folder", data_dir=str(flat), image_size=4, channels=3, num_classes=10)


# ----------------------------------------------------------------------------- latents


def _latent_arrays(n=6):
    rng = np.random.default_rng(0)
    return dict(
        latents=rng.normal(size=(n, 4, 4, 2)).astype(np.float32),
        labels=np.arange(n) % 3,
        context=rng.normal(size=(n, 5, 7)).astype(np.float16),
        context_mask=np.arange(5)[None, :] < (np.arange(n)[:, None] % 5 + 1),
    )


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "npy_dir"])
def test_latents_round_trip(tmp_path, kind):
    arrays = _latent_arrays()
    if kind == "npz":
        path = tmp_path / "lat.npz"
        np.savez(path, **arrays)
    elif kind == "npz_compressed":
        path = tmp_path / "lat.npz"
        np.savez_compressed(path, **arrays)
    else:
        path = tmp_path / "lat"
        path.mkdir()
        for k, v in arrays.items():
            np.save(path / f"{k}.npy", v)
    src = data.make_source(
        "latents", data_dir=str(path), image_size=4, channels=2, num_classes=3, max_text_len=16
    )
    assert len(src) == 6 and "0x" not in repr(src)
    if kind != "npz_compressed":  # stored members and .npy files stay on disk
        assert isinstance(src.arrays["latents"], np.memmap)
    for i in range(6):
        rec = src[i]
        np.testing.assert_array_equal(rec["image"], arrays["latents"][i])
        assert rec["labels"] == arrays["labels"][i] and rec["labels"].dtype == np.int32
        assert rec["context"].dtype == np.float32
        np.testing.assert_array_equal(rec["context"], arrays["context"][i].astype(np.float32))
        np.testing.assert_array_equal(rec["context_mask"], arrays["context_mask"][i])
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[5]["image"], arrays["latents"][5])
    with pytest.raises(ValueError, match=r"\(4, 4, 2\).*\(8, 8, 2\)"):
        data.make_source("latents", data_dir=str(path), image_size=8, channels=2)


def test_latents_refuse_pickled_object_arrays(tmp_path):
    lat = np.empty(2, dtype=object)
    lat[0], lat[1] = np.zeros((4, 4, 2)), np.zeros((4, 4, 2))
    for path in (tmp_path / "obj.npz",):
        np.savez(path, latents=lat)
        with pytest.raises(ValueError, match="never unpickles"):
            data.make_source("latents", data_dir=str(path), image_size=4, channels=2)
    np.savez_compressed(tmp_path / "objc.npz", latents=lat)
    with pytest.raises(ValueError, match="never unpickles"):
        data.make_source("latents", data_dir=str(tmp_path / "objc.npz"), image_size=4, channels=2)
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "latents.npy", lat, allow_pickle=True)
    with pytest.raises(ValueError, match="never unpickles"):
        data.make_source("latents", data_dir=str(tmp_path / "dir"), image_size=4, channels=2)


def test_latents_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_source("latents", data_dir=str(tmp_path / "x.npz"), image_size=4, channels=2)
    np.savez(tmp_path / "nolat.npz", images=np.zeros((2, 4, 4, 2), np.float32))
    with pytest.raises(FileNotFoundError, match="no 'latents'"):
        data.make_source("latents", data_dir=str(tmp_path / "nolat.npz"), image_size=4, channels=2)
    np.savez(tmp_path / "lab.npz", latents=np.zeros((2, 4, 4, 2), np.float32), labels=[0, 5])
    with pytest.raises(ValueError, match="data.num_classes=6"):
        data.make_source(
            "latents", data_dir=str(tmp_path / "lab.npz"), image_size=4, channels=2, num_classes=3
        )
    assert zipfile.is_zipfile(tmp_path / "lab.npz")
    np.savez(tmp_path / "nolab.npz", latents=np.zeros((2, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="no 'labels'"):
        data.make_source(
            "latents", data_dir=str(tmp_path / "nolab.npz"), image_size=4, channels=2, num_classes=3
        )
    np.savez(
        tmp_path / "tok.npz",
        latents=np.zeros((2, 4, 4, 2), np.float32),
        context=np.ones((2, 8), np.int32),
    )
    with pytest.raises(ValueError, match="data.max_text_len=8"):
        data.make_source("latents", data_dir=str(tmp_path / "tok.npz"), image_size=4, channels=2)
    tok = data.make_source(
        "latents", data_dir=str(tmp_path / "tok.npz"), image_size=4, channels=2, max_text_len=8
    )
    assert tok[0]["context"].dtype == np.int32 and tok[0]["context_mask"].all()


# ----------------------------------------------------------------------------- captions


def _word_ids(text: str) -> list[int]:
    """The word tokenizer's closed form: 1 + crc32(lower-cased word) % 4096."""
    return [1 + zlib.crc32(w.encode()) % captions.NUM_BUCKETS for w in text.lower().split()]


def test_digits_text_records_carry_tokenized_captions_and_labels():
    src = data.make_source(
        "digits_text",
        image_size=8,
        channels=1,
        max_text_len=16,
        caption_template="",
        num_classes=10,
    )
    assert len(src) == 1797 and "0x" not in repr(src)
    assert src.captions[7] == "a handwritten seven"
    i = int(np.flatnonzero(src.labels == 7)[0])
    rec = src[i]
    assert set(rec) == {"image", "labels", "context", "context_mask"}
    assert rec["labels"] == 7 and rec["context"].dtype == np.int32 and rec["context"].shape == (16,)
    assert rec["context_mask"].dtype == bool
    np.testing.assert_array_equal(rec["context"][:3], _word_ids("a handwritten seven"))
    np.testing.assert_array_equal(rec["context"][3:], 0)
    np.testing.assert_array_equal(rec["context_mask"], np.arange(16) < 3)
    np.testing.assert_array_equal(rec["image"], data.digits_source()[i]["image"])
    # The ten digit names land in ten different buckets: no two captions collide.
    rows = {tuple(src[int(np.flatnonzero(src.labels == k)[0])]["context"]) for k in range(10)}
    assert len(rows) == 10
    custom = data.make_source(
        "digits_text",
        image_size=8,
        channels=1,
        max_text_len=4,
        caption_template="digit {label} {name}",
    )
    assert custom.captions[3] == "digit 3 three"
    np.testing.assert_array_equal(custom[0]["context"].shape, (4,))
    batch = next(data.make_iterator(src, batch_size=32, seed=0))
    assert batch["context"].shape == (32, 16) and batch["context_mask"].shape == (32, 16)
    with pytest.raises(ValueError, match="caption_template"):
        data.make_source("digits_text", image_size=8, channels=1, caption_template="{nme}")


def _text_config(**data_fields):
    from diffjax.config import get_base_config

    c = get_base_config()
    c.data.update(data_fields)
    c.model.kwargs.context_dim = 32
    c.model.kwargs.text_vocab_size = captions.TEXT_VOCAB_SIZE
    return c


def test_caption_condition_tokenizes_class_captions_for_sampling():
    from diffjax import experiment

    c = _text_config(source="digits_text", image_size=8, channels=1, num_classes=10)
    labels = jnp.asarray([7, 0, 10, 3])  # 10 = the null class
    cond = experiment.sampling_condition(c, labels)
    assert set(cond) == {"context", "context_mask"}
    assert cond["context"].shape == (4, 16) and cond["context"].dtype == jnp.int32
    assert cond["context_mask"].shape == (4, 16) and cond["context_mask"].dtype == jnp.bool_
    src = data.make_source("digits_text", image_size=8, channels=1)
    seven = src[int(np.flatnonzero(src.labels == 7)[0])]
    np.testing.assert_array_equal(cond["context"][0], seven["context"])
    np.testing.assert_array_equal(cond["context_mask"][0], seven["context_mask"])
    assert not cond["context_mask"][2].any()  # null caption
    np.testing.assert_array_equal(cond["context"][3][:3], _word_ids("a handwritten three"))
    with pytest.raises(ValueError, match=r"got \[11\]"):
        captions.caption_condition(c, np.array([11]))
    c.model.kwargs.text_vocab_size = 257
    with pytest.raises(ValueError, match="TEXT_VOCAB_SIZE"):
        captions.caption_condition(c, np.array([1]))


def test_folder_sidecar_captions_and_class_captions(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    _save(tmp_path / "red_things" / "a.png", img)
    (tmp_path / "red_things" / "a.txt").write_text("A  red\nApple!\n")
    _save(tmp_path / "red_things" / "b.png", img)  # no caption -> null caption
    _save(tmp_path / "blue_sky" / "c.png", img)
    src = data.make_source(
        "folder", data_dir=str(tmp_path), image_size=4, channels=3, max_text_len=5
    )
    assert src.captioned and src.caption(1) == "A red Apple!" and src.caption(2) == ""
    rec = src[1]
    assert rec["labels"] == 1 and rec["context"].dtype == np.int32
    np.testing.assert_array_equal(rec["context"], _word_ids("a red apple") + [0, 0])
    np.testing.assert_array_equal(rec["context_mask"], [1, 1, 1, 0, 0])
    assert not src[2]["context_mask"].any() and not src[0]["context_mask"].any()
    c = _text_config(source="folder", data_dir=str(tmp_path), num_classes=2, max_text_len=5)
    c.data.caption_template = "a photo of {name}"
    cond = captions.caption_condition(c, np.array([1, 0]))
    # The tokenizer splits the folder name "red_things" into the words red, things.
    np.testing.assert_array_equal(cond["context"][0], _word_ids("a photo of red things")[:5])
    np.testing.assert_array_equal(cond["context"][1][:4], _word_ids("a photo of blue"))


def test_unlabelled_captioned_folder_samples_its_own_captions(tmp_path):
    for i, text in enumerate(["a cat", "", "a dog", "a cat"]):
        _save(tmp_path / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
        (tmp_path / f"{i}.txt").write_text(text)
    src = data.make_source("folder", data_dir=str(tmp_path), image_size=4, channels=3)
    assert src.labels is None and set(src[0]) == {"image", "context", "context_mask"}
    c = _text_config(source="folder", data_dir=str(tmp_path), num_classes=0, max_text_len=4)
    cond = captions.caption_condition(c, np.array([1, 0, 1]))
    np.testing.assert_array_equal(cond["context"][0], _word_ids("a dog") + [0, 0])
    np.testing.assert_array_equal(cond["context"][1], _word_ids("a cat") + [0, 0])
    with pytest.raises(ValueError, match=r"got \[2\]"):
        captions.caption_condition(c, np.array([2]))  # only two distinct captions


def test_latents_class_embeddings_and_names_for_sampling(tmp_path):
    rng = np.random.default_rng(0)
    class_context = rng.normal(size=(3, 5, 32)).astype(np.float32)
    path = tmp_path / "lat.npz"
    np.savez(
        path,
        latents=np.zeros((4, 4, 4, 2), np.float32),
        labels=np.array([0, 1, 2, 0]),
        class_names=np.array(["ant", "bee", "cat"]),
        class_context=class_context,
        class_context_mask=np.arange(5)[None] < np.array([[2], [3], [5]]),
    )
    c = _text_config(source="latents", data_dir=str(path), num_classes=3)
    c.model.kwargs.text_vocab_size = 0  # precomputed embeddings
    cond = captions.caption_condition(c, np.array([2, 3, 0]))
    assert cond["context"].shape == (3, 5, 32) and cond["context"].dtype == jnp.float32
    np.testing.assert_array_equal(cond["context"][0], class_context[2])
    np.testing.assert_array_equal(cond["context_mask"][0], [1, 1, 1, 1, 1])
    assert not cond["context_mask"][1].any()  # null class 3
    np.testing.assert_array_equal(cond["context_mask"][2], [1, 1, 0, 0, 0])
    c.model.kwargs.text_vocab_size = captions.TEXT_VOCAB_SIZE
    cond = captions.caption_condition(c, np.array([1]))
    np.testing.assert_array_equal(cond["context"][0][:1], _word_ids("bee"))
