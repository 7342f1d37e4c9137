"""Samples as a dataset (`launch/make_dataset.py`), `data.mix` and `data.num_examples`.

A tiny digits run writes a folder and an ArrayRecord dataset that read back through
`data.source='folder'` / `'tfds'` with the generated pixels and label ids exactly; a run
stopped after k batches and rerun gives the same bytes as an uninterrupted one; a rerun
with other arguments is refused; a mixed source interleaves in its ratio and trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.digits import get_config
from diffjax import data
from diffjax.data.sources import DIGIT_NAMES
from diffjax.generate import Generator
from diffjax.images import to_uint8
from diffjax.synthetic import Captions, check_resume, class_folders, write_dataset
from diffjax.train import train_and_evaluate
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, BS = 30, 8  # 4 batches, the last one partial


def _tiny(c):
    c.sample.num_images = 0
    c.sample.num_steps = 3
    c.sample.method = "ddim"
    c.train.num_steps = 4
    c.model.kwargs.update(channel_mult=(1,), attention_resolutions=(), mid_attention=False)
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mkds") / "run")
    train_and_evaluate(_tiny(get_config("quick")), workdir)
    return workdir


@pytest.fixture(scope="module")
def gen(run):
    return Generator.from_workdir(run)


@pytest.fixture(scope="module")
def expected(gen):
    return gen.generate(N, seed=0, batch_size=BS)


def _write(gen, out, **kwargs):
    args = dict(
        num_samples=N,
        args={"seed": 0},
        model={"path": "run", "step": int(gen.step), "sha256": "x"},
        seed=0,
        batch_size=BS,
        class_names=DIGIT_NAMES,
        progress=False,
    )
    args.update(kwargs)
    return write_dataset(gen, out, **args)


@pytest.fixture(scope="module")
def folder(gen, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mkds") / "folder")
    _write(gen, out)
    return out


def _files(root):
    found = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                found[os.path.relpath(p, root)] = f.read()
    return found


def test_class_folders_sort_in_label_order():
    assert class_folders(DIGIT_NAMES, 10)[:2] == ["0_zero", "1_one"]
    assert class_folders(["ant", "bee"], 2) == ["ant", "bee"]  # already sorted: kept
    assert class_folders([], 12)[:3] == ["00", "01", "02"]
    for names in (DIGIT_NAMES, [], ["b/x", "a"]):
        folders = class_folders(names, len(names) or 12)
        assert folders == sorted(folders)


def test_captions_follow_the_prompt_cycle_or_the_class():
    prompts = Captions(["a", "b", "c"], by_index=True)  # --prompts: image i, prompt i % 3
    assert [prompts(i, 0) for i in range(4)] == ["a", "b", "c", "a"]
    classes = Captions(["zero", "one"], by_index=False)  # a text model's class captions
    assert classes(7, 1) == "one"


def test_folder_reads_back_with_the_generated_pixels_and_labels(folder, expected):
    images, labels = expected
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["complete"] and meta["done"] == N and meta["counts"] == [3] * 10
    assert meta["sampler"] == {"method": "ddim", "num_steps": 3, "guidance": 1.5}
    src = data.make_source("folder", data_dir=folder, image_size=8, channels=1, num_classes=10)
    assert len(src) == N and src.class_names == class_folders(DIGIT_NAMES, 10)
    for k, path in enumerate(src.paths):
        i = int(os.path.splitext(os.path.basename(path))[0])
        rec = src[k]
        np.testing.assert_array_equal(to_uint8(rec["image"]), images[i])
        assert int(rec["labels"]) == labels[i] == i % 10


def test_array_record_reads_back_in_generation_order(gen, expected, tmp_path):
    out = str(tmp_path / "synth")
    meta = _write(gen, out, fmt="array_record")
    assert meta["complete"] and not os.path.exists(os.path.join(out, ".staging"))
    src = data.make_source("tfds", name="synth", data_dir=out, image_size=8, channels=1)
    assert len(src) == N and src.class_names == list(DIGIT_NAMES)
    got = np.stack([to_uint8(src[i]["image"]) for i in range(N)])
    np.testing.assert_array_equal(got, expected[0])
    assert [int(src[i]["labels"]) for i in range(N)] == expected[1].tolist()


@pytest.mark.parametrize("fmt", ["folder", "array_record"])
def test_killed_then_rerun_is_identical_to_an_uninterrupted_run(gen, folder, fmt, tmp_path):
    out = str(tmp_path / "synth")
    with pytest.raises(KeyboardInterrupt):
        _write(gen, out, fmt=fmt, stop_after=2)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert not meta["complete"] and meta["done"] == 2 * BS
    # What a kill during a write leaves: a temporary file, never renamed into place.
    stray = os.path.join(out, ".staging" if fmt == "array_record" else "0_zero", "x.png.tmp99")
    with open(stray, "wb") as f:
        f.write(b"partial")
    _write(gen, out, fmt=fmt)
    assert not os.path.exists(stray)
    if fmt == "folder":
        assert _files(out) == _files(folder)
        assert sum(f.endswith(".png") for f in _files(out)) == N
    else:
        once = str(tmp_path / "once" / "synth")
        _write(gen, once, fmt=fmt)
        a, b = _files(os.path.join(out, "synth")), _files(os.path.join(once, "synth"))
        assert sorted(a) == sorted(b)
        for name in a:
            if "array_record" in name:
                assert a[name] == b[name], name


def test_rerun_with_other_arguments_is_refused(gen, folder, tmp_path):
    with pytest.raises(ValueError, match=r"seed: 0 before, 1 now"):
        _write(gen, folder, args={"seed": 1}, seed=1)
    with pytest.raises(ValueError, match=r"batch_size: 8 before, 16 now"):
        _write(gen, folder, batch_size=16)
    (tmp_path / "x.txt").write_text("not mine")
    with pytest.raises(ValueError, match="not a make_dataset directory"):
        _write(gen, str(tmp_path))


def test_command_writes_a_folder_dataset(run, tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "make_dataset.py"), f"--workdir={run}"]
    cmd += ["--num_samples=12", f"--out={out}", "--batch_size=8", "--labels=3,7", "--seed=2"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["counts_by_folder"] == {"3_three": 6, "7_seven": 6}
    assert len(meta["model"]["sha256"]) == 64 and meta["model"]["step"] == 4
    assert sorted(os.listdir(os.path.join(out, "7_seven")))[:2] == ["01.png", "03.png"]
    # A rerun with another seed is refused before the model is loaded.
    with pytest.raises(ValueError, match="seed: 2 before, 3 now"):
        check_resume(out, {"seed": 3, "num_samples": 12})
    check_resume(out, {"seed": 2, "num_samples": 12, "labels": ["3", "7"]})


def test_num_examples_limits_any_source(folder):
    src = data.make_source("digits", image_size=8, channels=1, num_examples=10)
    assert len(src) == 10 and int(src[9]["labels"]) == 9
    src = data.make_source("folder", data_dir=folder, image_size=8, channels=1, num_examples=5)
    assert len(src) == 5
    with pytest.raises(ValueError, match=r"num_examples=31 but .* has 30 records"):
        data.make_source("folder", data_dir=folder, image_size=8, channels=1, num_examples=31)


def test_mix_interleaves_in_its_ratio_and_trains(folder, tmp_path):
    kw = dict(image_size=8, channels=1, num_classes=10)
    src = data.make_source("digits", mix=f"folder:{folder}:0.25", num_examples=90, **kw)
    assert isinstance(src, data.MixSource) and src.counts == [90, 30] and len(src) == 120
    comp = np.asarray([src.component(i)[0] for i in range(len(src))])
    for w in range(0, 120, 8):  # every window of 8 holds 2 synthetic records
        assert comp[w : w + 8].sum() == 2
    real = data.digits_source()
    syn = data.make_source("folder", data_dir=folder, **kw)
    for i in (0, 1, 2, 3, 119):
        k, j = src.component(i)
        want = (real if k == 0 else syn)[j]
        np.testing.assert_array_equal(src[i]["image"], want["image"])
        assert int(src[i]["labels"]) == int(want["labels"])
    with pytest.raises(ValueError, match="fraction"):
        data.make_source("digits", mix=f"folder:{folder}:1.5", **kw)
    two = tmp_path / "two"
    for k, name in enumerate(("a", "b")):
        (two / name).mkdir(parents=True)
        for f in os.listdir(os.path.join(folder, class_folders(DIGIT_NAMES, 10)[k])):
            os.link(os.path.join(folder, class_folders(DIGIT_NAMES, 10)[k], f), two / name / f)
    with pytest.raises(ValueError, match="has 2 classes but data.source has 10"):
        data.make_source("digits", image_size=8, channels=1, mix=f"folder:{two}:0.5")
    # The grain pipeline over the mix: seeded, and it resumes at the next batch.
    it = data.make_iterator(src, batch_size=8, seed=0)
    next(it)
    state = it.get_state()
    b2 = next(it)
    it2 = data.make_iterator(src, batch_size=8, seed=0)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["image"], b2["image"])
    c = _tiny(get_config("quick"))
    c.data.mix, c.data.num_examples = f"folder:{folder}:0.5", 64  # same steps: cached compile
    workdir = str(tmp_path / "mixed")
    train_and_evaluate(c, workdir)
    recorded = json.load(open(os.path.join(workdir, "config.json")))["data"]
    assert recorded["mix"] == c.data.mix and recorded["num_examples"] == 64
