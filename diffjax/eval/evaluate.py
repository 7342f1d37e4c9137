"""Evaluating generated samples: digits metrics, FID, memorization (copies of training
images), class balance and the classification accuracy score, one JSON per step."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class EvalMetrics(dict):
    """The metrics of one evaluation (a plain dict, JSON-ready) and its `figures`: uint8
    images keyed by name (`memorization`: the closest sample/training pairs), which
    `write_eval` writes beside the JSON as step_XXXXXXXX_<name>.png."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.figures: dict[str, np.ndarray] = {}


def evaluate_generator(
    generator, *, num_samples: int, batch_size: int, seed: int = 0
) -> EvalMetrics:
    """Generates `num_samples` images with `generator` and computes the configured metrics.

    Args:
      generator: a `diffjax.generate.Generator`; its config's `eval` section picks metrics:
        `digits_metrics` (conditional accuracy + Fréchet distance in a digits
        classifier's feature space), `reference_stats` + `inception_weights` (FID),
        `memorization` (nearest training images and the copy fraction, against the
        training set `config.data` describes), `cas` (classification accuracy score of
        a class-conditional digits model). Class balance is reported for class-conditional
        and digits-judged models.

    Returns:
      `EvalMetrics`: the JSON-ready metrics, with the memorization pairs' grid in
      `.figures` (written by `write_eval`).
    """
    config = generator.config
    check_eval_inputs(config.eval.reference_stats, config.eval.inception_weights)
    features = None
    if config.eval.get("memorization", False):  # bad settings fail before sampling
        from diffjax.eval import memorization

        memorization.check_threshold(float(config.eval.copy_threshold))
        if config.data.source != "latents":
            features = memorization.resolve_features(
                config.eval.memorization_features,
                inception_weights=config.eval.inception_weights,
                digits_metrics=bool(config.eval.digits_metrics),
                image_shape=generator.image_shape,
            )
    start = time.perf_counter()
    images, labels = generator.generate(
        num_samples, seed=seed, batch_size=batch_size, progress=True
    )
    sample_seconds = time.perf_counter() - start
    conditional = generator.num_classes > 0
    metrics = EvalMetrics(
        {
            "step": int(generator.step),
            "num_samples": int(num_samples),
            "sampler": {
                "method": config.sample.method,
                "num_steps": int(config.sample.num_steps),
                "guidance": float(config.sample.guidance),
            },
            "sample_seconds": sample_seconds,
        }
    )
    judged = None
    if config.eval.digits_metrics:
        from diffjax.eval.digits import digits_metrics

        metrics.update(digits_metrics(images, labels if conditional else None))
        judged = np.asarray(metrics["class_histogram"])
    if config.eval.reference_stats:
        metrics.update(
            fid_metrics(
                images,
                config.eval.reference_stats,
                config.eval.inception_weights,
                batch_size=min(batch_size, len(images)),
            )
        )
    train_labels = None
    if config.eval.get("memorization", False) and features is None:
        log.warning("eval.memorization skipped: data.source='latents' holds no images.")
        metrics["memorization"] = {
            "skipped": "data.source='latents' holds latents, not the training images; "
            "evaluate with data.* pointing at the images they were encoded from"
        }
    if features is not None:
        source = training_source(config, images.shape[1:])
        found, grid, train_labels = memorization.memorization_metrics(
            images,
            source,
            features=features,
            threshold=float(config.eval.copy_threshold),
            inception_weights=config.eval.inception_weights,
            num_examples=int(config.eval.memorization_num_train),
            batch_size=min(batch_size, 1024),
        )
        metrics["memorization"] = found
        metrics.figures["memorization"] = grid
    if conditional or judged is not None:
        if train_labels is None and judged is not None:
            from diffjax.eval.memorization import source_labels

            train_labels = source_labels(training_source(config, images.shape[1:]))
        k = max(generator.num_classes, 0 if judged is None else len(judged))
        metrics["class_balance"] = class_balance(
            k,
            requested=np.asarray(labels) if conditional else None,
            judged=judged,
            train=train_labels,
        )
    cas = config.eval.get("cas", False) and conditional and config.eval.digits_metrics
    if cas and len(np.unique(labels)) > 1:  # a classifier needs two classes to learn
        from diffjax.eval.digits import classification_accuracy_score

        metrics.update(classification_accuracy_score(images, np.asarray(labels), seed=seed))
    return metrics


def training_source(config, image_shape) -> Any:
    """The run's training source (`config.data`, with `data.num_examples` and `data.mix`
    as the run trained) at the generated images' shape (a latent run's pixels; a
    `latents` source keeps its own shape: its records are latents)."""
    from diffjax import data as data_lib

    fields = config.data.to_dict()
    if fields.get("source") == "dreambooth" and "dreambooth" in config:
        fields["dreambooth"] = config.dreambooth.to_dict()
    if fields.get("source") != "latents":
        fields["image_size"], _, fields["channels"] = image_shape
    return data_lib.make_source(**fields)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance 0.5 * sum |p - q| of two histograms (each normalized)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError(f"total_variation needs two non-empty histograms, got {p} and {q}.")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def class_balance(
    num_classes: int,
    *,
    requested: np.ndarray | None = None,
    judged: np.ndarray | None = None,
    train: np.ndarray | None = None,
) -> dict[str, Any]:
    """Class histograms of an evaluation and the judged classes' distance to training.

    Args:
      num_classes: K.
      requested: [N] classes the samples were generated for (None: unconditional).
      judged: [K] histogram of the classes a classifier assigns to the samples (None:
        no classifier for this data).
      train: [M] labels of the training records (None: unknown).

    Returns:
      {'requested', 'judged', 'train'} histograms (lists of K counts, or None) and
      'tv_to_train': the total-variation distance between the judged and the training
      class distributions (None unless both are known).
    """

    def hist(x):
        return (
            None if x is None else np.bincount(np.asarray(x), minlength=num_classes)[:num_classes]
        )

    judged_h = None if judged is None else np.asarray(judged)[:num_classes]
    train_h = hist(train)
    out: dict[str, Any] = {
        "requested": None if requested is None else hist(requested).tolist(),
        "judged": None if judged_h is None else judged_h.tolist(),
        "train": None if train_h is None else train_h.tolist(),
        "tv_to_train": None,
    }
    if judged_h is not None and train_h is not None:
        out["tv_to_train"] = total_variation(judged_h, train_h)
    return out


def check_eval_inputs(reference_stats: str, inception_weights: str) -> None:
    """Checks the FID inputs before any sampling, so a bad path fails in seconds.

    Loads the reference statistics and reads the Inception file's header (its tensor
    names; the weights themselves are loaded once, by the FID computation).

    Raises:
      FileNotFoundError / ValueError naming the file and the fix.
    """
    if not reference_stats:
        return
    if not inception_weights:
        raise ValueError(
            "eval.reference_stats is set but eval.inception_weights is empty; convert the "
            "pytorch-fid weights with launch/convert_inception.py and set it."
        )
    from safetensors import SafetensorError, safe_open

    from diffjax.eval.stats import load_statistics

    load_statistics(reference_stats)
    if not os.path.isfile(inception_weights):
        raise FileNotFoundError(
            f"eval.inception_weights {inception_weights!r} does not exist; convert the "
            "pytorch-fid weights with launch/convert_inception.py."
        )
    try:
        with safe_open(inception_weights, "np") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{inception_weights!r} is not a readable safetensors file: {e}") from e
    if not any(n.startswith("params/") for n in names):
        raise ValueError(
            f"{inception_weights!r} holds no converted Inception weights; convert pytorch-fid's "
            "weights with launch/convert_inception.py."
        )


def fid_metrics(
    images: np.ndarray, reference_stats: str, inception_weights: str, *, batch_size: int = 200
) -> dict[str, float]:
    """FID of uint8 `images` against a pytorch-fid style statistics file.

    The matrix square root uses the symmetric eigendecomposition, equal to pytorch-fid's
    `sqrtm` to rounding and several times faster at 2048 dimensions on CPU.
    """
    from diffjax.eval import fid

    return {
        "fid": fid.fid_from_images(
            images, reference_stats, inception_weights, batch_size, method="eigh"
        )
    }


def write_figures(metrics: dict[str, Any], stem: str) -> dict[str, Any]:
    """Writes an `EvalMetrics`' figures as STEM_<name>.png; returns the metrics entries
    that name them (`memorization.pairs_png`: the file's base name)."""
    from diffjax.images import save_grid

    updates: dict[str, Any] = {}
    for name, grid in getattr(metrics, "figures", {}).items():
        path = save_grid(grid[None], f"{stem}_{name}.png", ncols=1)
        entry = dict(metrics.get(name) or {})
        entry["pairs_png"] = os.path.basename(path)
        updates[name] = entry
    return updates


def write_eval(workdir: str, step: int, metrics: dict[str, Any]) -> str:
    """Writes workdir/eval/step_XXXXXXXX.json atomically; returns its path.

    The file's top level holds the newest metrics; an evaluation of the same step made
    earlier (another sampler, seed or sample count) is kept under `earlier`, newest last.
    """
    directory = os.path.join(workdir, "eval")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{int(step):08d}.json")
    record = dict(metrics)
    record.update(write_figures(metrics, path[: -len(".json")]))
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, json.JSONDecodeError):
            previous = None
        if isinstance(previous, dict):
            earlier = previous.pop("earlier", [])
            record["earlier"] = [*earlier, previous]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path
