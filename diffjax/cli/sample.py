"""Draws samples from a trained run (EMA params) or an export.

    python launch/sample.py --workdir=runs/digits --num_samples=100 --out=/tmp/s.npz \
        [--method=dpmpp_2m --steps=20 --guidance=3.0 --seed=0 --labels=3,3,7]

Writes FILE.npz with `images` (uint8 [N, H, W, C]) and `labels` (int [N]; class-
conditional models cycle 0..K-1 unless --labels is given) and a PNG grid beside it.
"""

from absl import flags

from diffjax.cli.common import run, setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to sample from (EMA params).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export directory to sample from.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of images.")
_OUT = flags.DEFINE_string("out", None, "Output .npz path.", required=True)
_METHOD = flags.DEFINE_string("method", None, "Sampler (default: the run's sample.method).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the run's sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (default: the run's sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_LABELS = flags.DEFINE_list("labels", None, "Class labels to draw (cycled to --num_samples).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per device call.")
_SERIALIZED = flags.DEFINE_bool(
    "serialized",
    False,
    "With --export_dir: run the exported jax.export sampler, not diffjax's code.",
)


def main(argv):
    del argv
    setup_logging()
    if bool(_WORKDIR.value) == bool(_EXPORT_DIR.value):
        raise ValueError("Pass exactly one of --workdir or --export_dir.")
    if not _OUT.value.endswith(".npz"):
        raise ValueError(
            f"--out must end in .npz (a PNG grid is written beside it), got {_OUT.value!r}."
        )
    if _NUM.value < 1:
        raise ValueError(f"--num_samples must be >= 1, got {_NUM.value}.")
    labels = _parse_labels(_LABELS.value)
    from diffjax import experiment, generate

    overrides = dict(method=_METHOD.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value)
    if _WORKDIR.value:
        generator = generate.Generator.from_workdir(_WORKDIR.value, step=_STEP.value, **overrides)
    else:
        generator = generate.Generator.from_export(
            _EXPORT_DIR.value, serialized=_SERIALIZED.value, **overrides
        )
    source = _WORKDIR.value or _EXPORT_DIR.value
    sc = generator.config.sample
    print(
        f"Sampling {_NUM.value} images from step {generator.step} of {source} "
        f"({sc.method}, {sc.num_steps} steps, guidance {sc.guidance})."
    )
    npz, png = generate.write_samples(
        _OUT.value,
        generator.batches(
            _NUM.value, seed=_SEED.value, labels=labels, batch_size=_BATCH.value, progress=True
        ),
        _NUM.value,
        experiment.image_shape(generator.config),
        ncols=generator.num_classes or None,
    )
    print(f"Wrote {_NUM.value} samples to {npz} and a grid to {png}")


def _parse_labels(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    bad = [v for v in values if not v.strip().lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"--labels takes class indices such as --labels=3,3,7; got {bad}.")
    return [int(v) for v in values]


def entry() -> None:
    """Console-script entry point (`diffjax-sample`)."""
    run(main)
