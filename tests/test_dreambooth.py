"""DreamBooth: instance + class records, the weighted loss, class images made once by the
base and reused, and a quick run on a tiny text-conditioned digits base."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.digits_dreambooth import get_config
from configs.digits_text import get_config as text_config
from diffjax.data import make_source
from diffjax.data.dreambooth import CLASS_FILE, DreamBoothSource
from diffjax.data.sources import load_digits_arrays
from diffjax.data.tokens import tokenize
from diffjax.generate import class_images
from diffjax.train import train_and_evaluate
from diffjax.train.step import make_loss_fn


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    d = tmp_path_factory.mktemp("instances")
    x, y = load_digits_arrays()
    for i, img in enumerate(x[y == 3][:4]):
        Image.fromarray(np.ascontiguousarray(img[:, ::-1, 0])).save(d / f"{i}.png")
    return str(d)


def _class_dir(tmp_path, n=6):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / CLASS_FILE,
        images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
        captions=np.asarray(["a handwritten one", "a handwritten two"] * (n // 2)),
    )
    return str(tmp_path)


def test_records_alternate_instance_and_class_with_their_weights(instances, tmp_path):
    src = DreamBoothSource(
        instances, "a handwritten sks three", image_size=8, channels=1, max_text_len=4,
        class_dir=_class_dir(tmp_path), prior_loss_weight=0.5,
    )  # fmt: skip
    assert len(src) == 12  # 2 x max(4 instances, 6 class images)
    ids, _ = tokenize(["a handwritten sks three", "a handwritten two"], 4)
    r0, r1, r3 = src[0], src[1], src[3]
    np.testing.assert_array_equal(r0["context"], ids[0])
    assert r0["loss_weight"] == 1.0 and r1["loss_weight"] == 0.5
    np.testing.assert_array_equal(r3["context"], ids[1])  # class image 1: "two"
    assert r0["image"].shape == (8, 8, 1) and r1["image"].dtype == np.float32
    alone = DreamBoothSource(
        instances, "a handwritten sks three", image_size=8, channels=1, max_text_len=4
    )
    assert len(alone) == 4 and all(alone[i]["loss_weight"] == 1.0 for i in range(4))


def test_missing_or_mismatched_class_images_are_named(instances, tmp_path):
    kw = dict(image_size=8, channels=1, max_text_len=4, prior_loss_weight=1.0)
    with pytest.raises(FileNotFoundError, match="class_images.npz is missing"):
        DreamBoothSource(instances, "sks", class_dir=str(tmp_path), **kw)
    with pytest.raises(ValueError, match="instance_prompt is empty"):
        DreamBoothSource(instances, " ", **kw)
    kw["image_size"] = 16
    with pytest.raises(ValueError, match="delete"):
        DreamBoothSource(instances, "sks", class_dir=_class_dir(tmp_path), **kw)


def test_loss_is_the_weighted_mean_of_the_per_example_losses():
    def diffusion_loss(model_fn, x0, key):
        return jnp.sum(model_fn(x0, None) ** 2, axis=(1, 2, 3)), {}

    loss_fn = make_loss_fn(
        lambda v, x, t, **kw: x * v["params"]["w"], diffusion_loss, cond_dropout=0.0,
        num_classes=0,
    )  # fmt: skip
    x = jnp.arange(4.0).reshape(4, 1, 1, 1)
    params = {"w": jnp.float32(2.0)}
    plain = loss_fn(params, {"image": x}, jax.random.key(0))
    w = jnp.array([1.0, 1.0, 0.5, 0.0])
    weighted = loss_fn(params, {"image": x, "loss_weight": w}, jax.random.key(0))
    per = (2 * jnp.arange(4.0)) ** 2
    np.testing.assert_allclose(plain, per.mean())
    np.testing.assert_allclose(weighted, (per * w).mean())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("db") / "base")
    c = text_config("quick")
    c.sample.num_images = 0
    # One level, its cross-attention at 8x8: text conditioning at a third of the compile.
    c.model.kwargs.update(channel_mult=(1,), attention_resolutions=(8,), mid_attention=False)
    train_and_evaluate(c, workdir)
    return workdir


def test_quick_dreambooth_run_generates_its_class_images_once(base, instances, tmp_path):
    c = get_config("quick")
    c.base_workdir, c.dreambooth.instance_dir = base, instances
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir)
    class_dir = os.path.join(workdir, "class_images")
    with open(os.path.join(class_dir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["num_class_images"] == 16 and len(meta["prompts"]) == 10
    with np.load(os.path.join(class_dir, CLASS_FILE)) as f:
        assert f["images"].shape == (16, 8, 8, 1)
        assert str(f["captions"][3]) == "a handwritten three"
    stamp = os.path.getmtime(os.path.join(class_dir, CLASS_FILE))
    resolved = json.load(open(os.path.join(workdir, "config.json")))
    config = get_config("quick")
    config.update_from_flattened_dict({"base_workdir": base})
    config.dreambooth.update(resolved["dreambooth"])
    assert class_images(config) == os.path.join(class_dir, CLASS_FILE)  # reused
    assert os.path.getmtime(os.path.join(class_dir, CLASS_FILE)) == stamp
    config.dreambooth.num_class_images = 8
    with pytest.raises(ValueError, match="num_class_images"):
        class_images(config)
    # The run's source reads them (the run's sampling of prompts: test_train_loop).
    data = dict(resolved["data"], dreambooth=resolved["dreambooth"])
    assert len(make_source(**data)) == 2 * 16


def test_grid_captions_cycle_the_instance_and_class_prompts(instances, tmp_path):
    from diffjax.data.captions import caption_condition

    c = get_config("quick")
    c.dreambooth.instance_dir = instances
    c.dreambooth.class_dir = _class_dir(tmp_path)
    ids, _ = tokenize(["a handwritten sks three", "a handwritten one", "a handwritten two"], 4)
    got = caption_condition(c, np.arange(10))["context"]
    np.testing.assert_array_equal(got, ids[np.arange(10) % 3])
    c.dreambooth.prior_loss_weight = 0.0  # no class images: every row asks for the instance
    got = caption_condition(c, np.arange(10))["context"]
    np.testing.assert_array_equal(got, np.tile(ids[0], (10, 1)))
