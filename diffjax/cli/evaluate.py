"""Evaluates a checkpoint: generates samples and computes the configured metrics.

    python launch/evaluate.py --workdir=runs/digits [--step=4000] \
        [--config.eval.num_samples=2000 --config.sample.guidance=3.0 ...]

The run's own config (WORKDIR/config.json) is used; `--config.*` overrides any field
of it. Writes WORKDIR/eval/step_XXXXXXXX.json.
"""

from absl import flags

from diffjax.cli.common import override_flag, run, setup_logging, workdir_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CONFIG = override_flag()


def main(argv):
    del argv
    setup_logging()
    from diffjax import experiment
    from diffjax.eval.evaluate import check_eval_inputs, evaluate_generator, write_eval
    from diffjax.generate import Generator

    config = workdir_config(_WORKDIR.value, _CONFIG)
    experiment.check_config(config)
    check_eval_inputs(config.eval.reference_stats, config.eval.inception_weights)
    generator = Generator.from_workdir(_WORKDIR.value, step=_STEP.value, config=config)
    metrics = evaluate_generator(
        generator,
        num_samples=config.eval.num_samples,
        batch_size=config.eval.batch_size,
        seed=_SEED.value,
    )
    path = write_eval(_WORKDIR.value, generator.step, metrics)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(f"Step {generator.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    print(f"Wrote {path}")


def entry() -> None:
    """Console-script entry point (`diffjax-evaluate`)."""
    run(main)
