"""configs/cifar10_ddpm.py trains from tfds (a dataset the test writes) and from an image folder."""

import json
import os

import numpy as np
from PIL import Image

from configs.cifar10_ddpm import get_config
from diffjax.train import train_and_evaluate
from tests.test_data_sources import DiffjaxTestImages


def _check_run(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"


def test_cifar10_config_from_tfds_array_record(tmp_path):
    data_dir = str(tmp_path / "tfds")
    DiffjaxTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    config = get_config("quick")
    config.sample.num_images = 0
    config.data.name = "diffjax_test_images"  # the test's own tfds dataset, 6x6 -> 32x32
    config.data.data_dir = data_dir
    train_and_evaluate(config, str(tmp_path / "run"))
    _check_run(str(tmp_path / "run"))


def test_cifar10_config_from_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("airplane", "cat"):
        os.makedirs(tmp_path / "images" / cls)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "images" / cls / f"{i}.png"
            )
    config = get_config("quick")
    config.sample.num_images = 0
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "images")
    train_and_evaluate(config, str(tmp_path / "run"))
    _check_run(str(tmp_path / "run"))
