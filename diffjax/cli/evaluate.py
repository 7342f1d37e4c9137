"""Evaluates a checkpoint or a pretrained pipeline: generates samples, computes metrics.

    python launch/evaluate.py --workdir=runs/digits [--step=4000] \
        [--config.eval.num_samples=2000 --config.sample.guidance=3.0 ...]
    python launch/evaluate.py --pretrained=DIT_DIR --out=dit_fid.json \
        --config.eval.reference_stats=imagenet256.npz \
        --config.eval.inception_weights=pt_inception.safetensors \
        --config.eval.num_samples=50000 --config.sample.num_steps=250 --config.sample.guidance=1.5
    python launch/evaluate.py --pretrained=SD_DIR --lora=style.safetensors [--lora_scale=0.8] ...
    python launch/evaluate.py --cas_dataset=SYNTH_DIR [--out=cas.json]

The run's own config (WORKDIR/config.json) is used; `--config.*` overrides any field
of it. Writes WORKDIR/eval/step_XXXXXXXX.json. With --pretrained (a diffusers pipeline
directory: DiT, or a diffjax export in diffusers format) the `sample.*` and `eval.*`
fields apply; `sample.method` overrides the scheduler's own sampler; results go to --out.
`--lora` / `--lora_scale` merge LoRA files into a Stable Diffusion pipeline first, as in
sample.py. With --pretrained, `eval.memorization` searches the training set that the
`--config.data.*` fields describe. `--cas_dataset` scores a folder of labelled digits
(`ROOT/<class>/<i>.png`, as make_dataset.py writes) with the classification accuracy
score and its real-data baseline, and evaluates no model.
"""

import os
import sys

from absl import flags

from diffjax.cli.common import apply_overrides, override_flag, run, setup_logging, workdir_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A diffusers pipeline directory (model_index.json) to evaluate."
)
_OUT = flags.DEFINE_string("out", None, "With --pretrained: the JSON file to write.")
_LORA = flags.DEFINE_multi_string(
    "lora", None, "With --pretrained: a LoRA file (or directory) to merge; repeat for several."
)
_LORA_SCALE = flags.DEFINE_multi_float(
    "lora_scale", None, "Scale of the --lora files: one for all, or one per file (default 1.0)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest good one).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CAS_DATASET = flags.DEFINE_string(
    "cas_dataset",
    None,
    "A folder of labelled digits (ROOT/<class>/<i>.png): print its classification accuracy "
    "score (a digits classifier trained on it, tested on real digits) and the real baseline.",
)
_CONFIG = override_flag()


def main(argv):
    del argv
    setup_logging()
    from diffjax import experiment
    from diffjax.eval.evaluate import check_eval_inputs, evaluate_generator, write_eval
    from diffjax.generate import Generator

    if _CAS_DATASET.value:
        if _WORKDIR.value or _PRETRAINED.value:
            raise ValueError("--cas_dataset scores a folder alone; drop --workdir/--pretrained.")
        return _score_dataset(_CAS_DATASET.value)
    if bool(_WORKDIR.value) == bool(_PRETRAINED.value):
        raise ValueError("Pass exactly one of --workdir, --pretrained or --cas_dataset.")
    if (_LORA.value or _LORA_SCALE.value) and not _PRETRAINED.value:
        raise ValueError(
            "--lora/--lora_scale apply to --pretrained=SD_DIR only (the LoRA file is merged "
            "into that pipeline); pass the base pipeline as --pretrained instead of --workdir."
        )
    if _PRETRAINED.value:
        return _evaluate_pretrained()
    config = workdir_config(_WORKDIR.value, _CONFIG)
    experiment.require_diffusion(config, _WORKDIR.value, "evaluate.py (sampling + FID)")
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
    _print_checks(metrics)
    print(f"Wrote {path}")


def _print_checks(metrics) -> None:
    memo, balance = metrics.get("memorization"), metrics.get("class_balance")
    if memo:
        print(
            f"Memorization ({memo['features']}): copy fraction {memo['copy_fraction']:.4g} "
            f"(d1 < {memo['threshold']:.3g} d2), nearest-distance median "
            f"{memo['nn_distance']['p50']:.4g}"
        )
    if balance and balance.get("tv_to_train") is not None:
        print(
            f"Class balance: judged {balance['judged']}, TV to train {balance['tv_to_train']:.4g}"
        )


def _score_dataset(root: str) -> None:
    import json

    from diffjax.eval.digits import classification_accuracy_score, load_labelled_digits

    images, labels = load_labelled_digits(root)
    result = classification_accuracy_score(images, labels, seed=_SEED.value)
    result["dataset"] = os.path.abspath(root)
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    print(
        f"CAS {result['cas']:.4f} ({len(labels)} images of {root}), real baseline "
        f"{result['cas_real_baseline']:.4f} ({result['cas_real_baseline_num_train']} real "
        f"digits); test: {result['cas_test']}"
    )
    if _OUT.value:
        print(f"Wrote {_OUT.value}")


def _evaluate_pretrained() -> None:
    import json

    from diffjax.config import get_base_config
    from diffjax.eval.evaluate import check_eval_inputs, evaluate_generator, write_figures
    from diffjax.pretrained import lora_files, pipeline

    if not _OUT.value or not _OUT.value.endswith(".json"):
        raise ValueError(
            "--pretrained needs --out=FILE.json (the pretrained directory is not written)."
        )
    asked = apply_overrides(get_base_config(), _CONFIG)
    check_eval_inputs(asked.eval.reference_stats, asked.eval.inception_weights)
    given = any(a.startswith("--config.sample.method=") for a in sys.argv[1:])
    method = asked.sample.method if given else None  # else the scheduler's own sampler
    loras = lora_files.pair_scales(_LORA.value, _LORA_SCALE.value)
    for path, _ in loras:
        lora_files.lora_file(path)  # a missing file or a pickle fails before the load
    pipe = pipeline.load_pipeline(_PRETRAINED.value, method=method)
    if loras:
        pipe = lora_files.apply_lora_files(pipe, loras)
    generator = pipeline.PretrainedGenerator(
        pipe, num_steps=asked.sample.num_steps, guidance=asked.sample.guidance
    )
    generator.config.eval = asked.eval
    # The training set that eval.memorization searches: the --config.data.* fields given
    # (the pipeline's own data fields, its image shape and classes, stay as they are).
    for arg in sys.argv[1:] if asked.eval.memorization else ():
        if arg.startswith("--config.data."):
            name = arg[len("--config.data.") :].split("=")[0]
            generator.config.data[name] = asked.data[name]
    lora_note = f" with LoRA {lora_files.describe_files(loras)}" if loras else ""
    print(f"Evaluating {pipeline.describe(pipe)}{lora_note}")
    metrics = evaluate_generator(
        generator,
        num_samples=asked.eval.num_samples,
        batch_size=asked.eval.batch_size,
        seed=_SEED.value,
    )
    metrics["pretrained"] = os.path.abspath(_PRETRAINED.value)
    if loras:
        metrics["lora"] = [[os.path.abspath(f), s] for f, s in loras]
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    record = dict(metrics)
    record.update(write_figures(metrics, _OUT.value[: -len(".json")]))
    with open(_OUT.value, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))
    _print_checks(metrics)
    print(f"Wrote {_OUT.value}")


def entry() -> None:
    """Console-script entry point (`diffjax-evaluate`)."""
    run(main)
