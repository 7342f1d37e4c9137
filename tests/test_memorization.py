"""Memorization (nearest training images, copy fraction), class balance and the
classification accuracy score in evaluation (diffjax/eval/memorization.py, evaluate.py,
digits.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffjax.data import ArraySource, digits_source, load_digits_arrays
from diffjax.data.sources import DIGIT_NAMES
from diffjax.eval import memorization
from diffjax.eval.digits import classification_accuracy_score, load_labelled_digits
from diffjax.eval.evaluate import class_balance, total_variation
from diffjax.images import to_uint8


def _brute_force(q, r, k):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - r[None].astype(np.float64)) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 24)).astype(np.float32) + 3.0  # 37 queries on 8 devices
    r = rng.normal(size=(1000, 24)).astype(np.float32) + 3.0
    want_d, want_i = _brute_force(q, r, 3)
    # One array in chunks of 96 (1000 = 10 * 96 + 40), and a stream of uneven pieces.
    d, i = memorization.nearest_neighbours(q, r, k=3, chunk_size=96)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-4)
    pieces = [r[:7], r[7:500], r[500:501], r[501:]]
    d, i = memorization.nearest_neighbours(q, iter(pieces), k=2, chunk_size=128)
    np.testing.assert_array_equal(i, want_i[:, :2])
    np.testing.assert_allclose(d, want_d[:, :2], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least k=2"):
        memorization.nearest_neighbours(q, r[:1], k=2)


def test_copy_ratio_and_percentiles():
    d = np.array([[0.0, 0.0], [1.0, 4.0], [2.0, 3.0]])
    np.testing.assert_allclose(memorization.copy_ratio(d), [0.0, 0.25, 2.0 / 3.0])
    assert memorization.percentiles(np.arange(101.0)) == {
        "p1": 1.0,
        "p5": 5.0,
        "p50": 50.0,
        "p95": 95.0,
    }


@pytest.fixture(scope="module")
def half0():
    return digits_source("half0")


@pytest.mark.parametrize("features", ["pixels", "digits"])
def test_copies_are_flagged_and_new_images_are_not(half0, features):
    train = to_uint8(half0.images)
    rng = np.random.default_rng(1)
    copies = train[rng.permutation(len(train))[:64]]
    noisy = np.clip(copies.astype(int) + rng.integers(-8, 9, copies.shape), 0, 255)
    fresh = rng.integers(0, 256, size=(64, 8, 8, 1))

    def fraction(images):
        m, grid, labels = memorization.memorization_metrics(
            np.asarray(images, np.uint8), half0, features=features
        )
        return m, grid, labels

    m, grid, labels = fraction(copies)
    assert m["copy_fraction"] == 1.0 and m["nn_distance"]["p95"] < 1e-2
    assert m["threshold"] == pytest.approx(1 / 3) and m["features"] == features
    assert m["num_train"] == m["num_train_records"] == len(train)
    np.testing.assert_array_equal(labels, half0.labels)
    assert grid.dtype == np.uint8 and grid.shape[-1] == 1
    assert fraction(noisy)[0]["copy_fraction"] == 1.0
    assert fraction(fresh)[0]["copy_fraction"] == 0.0
    # Real digits the training set does not hold: the false-positive rate (measured 0/898).
    held_out = to_uint8(digits_source("half1").images)[:-1]
    assert fraction(held_out)[0]["copy_fraction"] <= 0.01


def test_duplicated_training_images_are_counted_once():
    images, labels = load_digits_arrays()
    train = ArraySource(np.concatenate([images[:20], images[:5]]), np.arange(25) % 10)
    m, _, _ = memorization.memorization_metrics(images[:5], train, features="pixels")
    assert m["copy_fraction"] == 1.0 and m["num_train"] == 20 and m["num_train_records"] == 25


def test_feature_space_choice():
    kw = dict(inception_weights="", digits_metrics=True, image_shape=(8, 8, 1))
    assert memorization.resolve_features("auto", **kw) == "digits"
    assert memorization.resolve_features("auto", **{**kw, "digits_metrics": False}) == "pixels"
    # A digits run keeps the digits features with Inception weights; other runs take them.
    assert memorization.resolve_features("auto", **{**kw, "inception_weights": "w"}) == "digits"
    other = {**kw, "inception_weights": "w", "image_shape": (32, 32, 3)}
    assert memorization.resolve_features("auto", **other) == "inception"
    with pytest.raises(ValueError, match="inception_weights"):
        memorization.resolve_features("inception", **kw)
    with pytest.raises(ValueError, match="8x8x1"):
        memorization.resolve_features("digits", **{**kw, "image_shape": (32, 32, 3)})
    with pytest.raises(ValueError, match="memorization_features"):
        memorization.resolve_features("lpips", **kw)


def test_class_balance_total_variation():
    # judged [5, 3, 2] / 10 vs train [1, 1, 2] / 4: TV = 0.5 (0.25 + 0.05 + 0.3) = 0.3.
    out = class_balance(
        3,
        requested=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
        judged=np.array([5, 3, 2]),
        train=np.array([0, 1, 2, 2]),
    )
    assert out["requested"] == [4, 3, 3] and out["judged"] == [5, 3, 2]
    assert out["train"] == [1, 1, 2] and out["tv_to_train"] == pytest.approx(0.3)
    assert class_balance(3, requested=np.array([0, 1]))["tv_to_train"] is None
    assert total_variation([1, 0], [0, 1]) == 1.0


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")  # the shuffled-label fit
def test_classification_accuracy_score(tmp_path):
    images, labels = load_digits_arrays()
    real_x, real_y = images[0::2][:400], labels[0::2][:400]
    real = classification_accuracy_score(real_x, real_y)
    assert real["cas_num_train"] == real["cas_real_baseline_num_train"] == 400
    assert real["cas"] > 0.85 and abs(real["cas"] - real["cas_real_baseline"]) < 0.03
    shuffled = np.random.default_rng(0).permutation(real_y)
    assert classification_accuracy_score(real_x, shuffled, baseline=False)["cas"] < 0.25
    # A make_dataset folder: ROOT/<digit name>/<i>.png.
    for i in range(60):
        d = os.path.join(tmp_path, DIGIT_NAMES[real_y[i]])
        os.makedirs(d, exist_ok=True)
        Image.fromarray(real_x[i, ..., 0]).save(os.path.join(d, f"{i:05d}.png"))
    x, y = load_labelled_digits(str(tmp_path))
    assert sorted(y.tolist()) == sorted(real_y[:60].tolist())  # class by class
    got = {(a.tobytes(), int(b)) for a, b in zip(x, y, strict=True)}
    assert got == {(real_x[i].tobytes(), int(real_y[i])) for i in range(60)}
    with pytest.raises(ValueError, match="0..9"):
        classification_accuracy_score(real_x, real_y + 1)
    # The command: the same score of the folder, as JSON.
    out = tmp_path / "cas.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [
            sys.executable,
            os.path.join(root, "launch", "evaluate.py"),
            f"--cas_dataset={tmp_path}",
            f"--out={out}",
        ],
        check=True,
        cwd=root,
        capture_output=True,
    )
    report = json.load(open(out))
    assert report["cas"] == classification_accuracy_score(x, y, baseline=False)["cas"]
    assert report["cas_num_train"] == report["cas_real_baseline_num_train"] == 60


def test_evaluation_json_of_a_small_data_digits_run(tmp_path):
    """evaluate_generator on a digits model with data.num_examples=10 (a tiny U-Net at
    its random init: the plumbing needs no trained model, and compiling a train step
    would triple this file's time): the JSON carries the memorization, class balance
    and CAS fields, searched against those 10 training images."""
    import jax
    from flax import linen as nn

    from configs.digits import get_config
    from diffjax import experiment, parallel
    from diffjax.eval.evaluate import evaluate_generator, write_eval
    from diffjax.generate import Generator
    from diffjax.sample_fn import make_sample_fn

    c = get_config("quick")
    c.model.kwargs.update(
        base_channels=8,
        num_groups=4,
        channel_mult=(1,),
        attention_resolutions=(),
        mid_attention=False,
    )
    c.sample.num_steps = 2
    c.data.num_examples = 10
    assert get_config().eval.memorization and get_config().eval.cas  # the digits default
    c.eval.update(memorization=True, cas=True)  # (quick turns them off)
    assert c.eval.memorization_features == "auto"
    model, schedule = experiment.build_model(c), experiment.build_schedule(c)
    params = nn.meta.unbox(experiment.make_init_fn(model, c)(jax.random.key(0)))
    generator = Generator(
        config=c,
        params=params,
        sample_fn=make_sample_fn(model.apply, schedule, **experiment.sampler_kwargs(c)),
        mesh=parallel.make_mesh(-1, 1),
        step=2,
    )
    metrics = evaluate_generator(generator, num_samples=40, batch_size=40)
    workdir = str(tmp_path / "run")
    path = write_eval(workdir, generator.step, metrics)
    report = json.load(open(path))
    memo = report["memorization"]
    assert 0.0 <= memo["copy_fraction"] <= 1.0 and memo["features"] == "digits"
    assert memo["num_train"] == 10 and memo["num_samples"] == 40
    assert memo["threshold"] == pytest.approx(1 / 3)
    assert set(memo["nn_distance"]) == {"p1", "p5", "p50", "p95"}
    assert memo["pairs_png"] == "step_00000002_memorization.png"
    png = np.asarray(Image.open(os.path.join(workdir, "eval", memo["pairs_png"])))
    assert png.ndim == 2 and png.shape[1] > png.shape[0]  # 4 rows of 4 pairs (8 tiles)
    balance = report["class_balance"]
    assert balance["requested"] == [4] * 10 and sum(balance["judged"]) == 40
    assert balance["train"] == [1] * 10  # the first 10 digits are 0..9
    assert 0.0 <= balance["tv_to_train"] <= 1.0
    assert 0.0 <= report["cas"] <= 1.0 and 0.0 <= report["cas_real_baseline"] <= 1.0
    assert report["cas_num_train"] == report["cas_real_baseline_num_train"] == 40
