"""Writes a model's samples as a dataset that training jobs read (synthetic data).

    python launch/make_dataset.py --workdir=runs/digits --num_samples=1000 --out=/data/synth \
        [--format=folder|array_record] [--labels=3,7] [--method=ddim --steps=20 \
        --guidance=2.0 --seed=0 --batch_size=256] [--name=synth]
    python launch/make_dataset.py --export_dir=EXPORT ... | --pretrained=PIPELINE_DIR ...
    python launch/make_dataset.py --workdir=TEXT_RUN --prompts=prompts.txt ...

Formats:

* `folder` (default): `OUT/<class folder>/<index>.png` for class-conditional models,
  `OUT/<index>.png` otherwise; text models get a `.txt` caption beside each image. Read
  it back with `data.source='folder'`, `data.data_dir=OUT`: the folder source numbers
  classes by sorted folder name, so folders are named to sort in label order (the
  source data's class names when they already do, e.g. an image folder's; otherwise
  `<label>_<name>`, e.g. `0_zero` ... `9_nine` for digits, or `<label>`), and the label
  ids read back are the model's. (With `--labels` covering only some classes the folder
  source renumbers those it finds; `array_record` keeps every id.)
* `array_record`: a tfds dataset `OUT/<name>/1.0.0/` (`--name`, default OUT's basename)
  with `image`, `label` (ClassLabel with every class name) and, for text models,
  `caption`; records in generation order. Read it with `data.source='tfds'`,
  `data.name=<name>`, `data.data_dir=OUT` (or mix it in: `data.mix='tfds:OUT:0.5'`).

Classes are balanced by default (labels cycle 0..K-1); `--labels` restricts them (cycled);
`--prompts=FILE.txt` (one prompt per line, cycled) drives a text model. Images are
generated batch by batch (sharded over the devices, `Generator.batches`) and streamed to
disk: memory is bounded by one batch.

Resume: `OUT/meta.json` is written first, with the arguments, and updated after every
batch (`done`). Rerunning the same command after a kill continues at the next batch; the
noise of image i depends only on `--seed` and its batch, so the files are identical to
an uninterrupted run's, with no index missing or repeated. A rerun with other arguments
(or another model) is refused, naming the difference. Every file is written atomically
(a temporary name, then `os.replace`). `array_record` stages each batch in
`OUT/.staging/` and builds the tfds dataset when all are done (tfds itself moves the
finished dataset into place); `meta.json`'s `complete` turns true only at the very end,
so a killed run never looks finished.

`meta.json`: the model (kind, path, checkpoint step, SHA-256 of its params / weights),
the sampler (method, steps, guidance), seed, num_samples, batch size, format, class
names and folders, images per class, `done` and `complete`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from absl import flags

from diffjax.cli.common import parse_labels, run, setup_logging
from diffjax.synthetic import FORMATS, check_resume, read_prompts, write_dataset

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to sample from (EMA params).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Export directory to sample from.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "A diffusers pipeline directory (model_index.json) to sample from."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (--workdir; default: latest good).")
_NUM = flags.DEFINE_integer("num_samples", None, "Number of images.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output dataset directory.", required=True)
_FORMAT = flags.DEFINE_enum("format", "folder", list(FORMATS), "Dataset format.")
_NAME = flags.DEFINE_string(
    "name", None, "array_record: the tfds dataset name (default: --out's basename)."
)
_LABELS = flags.DEFINE_list(
    "labels", None, "Class labels to draw (cycled); default: every class in turn (balanced)."
)
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "Text models: a .txt file of prompts, one per line (cycled)."
)
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "--pretrained: the negative prompt.")
_METHOD = flags.DEFINE_string("method", None, "Sampler (default: the model's sample.method).")
_STEPS = flags.DEFINE_integer("steps", None, "Solver steps (default: the model's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (default: the model's).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Images per device call (default 256; 16 with --pretrained)."
)


# ---------------------------------------------------------------------------- naming


def _args() -> dict[str, Any]:
    """The arguments a resume must repeat."""
    prompts = read_prompts(_PROMPTS.value) if _PROMPTS.value else None
    return {
        "workdir": _abspath(_WORKDIR.value),
        "export_dir": _abspath(_EXPORT_DIR.value),
        "pretrained": _abspath(_PRETRAINED.value),
        "step": _STEP.value,
        "method": _METHOD.value,
        "steps": _STEPS.value,
        "guidance": _GUIDANCE.value,
        "seed": _SEED.value,
        "labels": _LABELS.value,
        "prompts_sha256": (
            hashlib.sha256("\n".join(prompts).encode()).hexdigest() if prompts else None
        ),
        "negative_prompt": _NEGATIVE.value,
    }


def _abspath(p: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(p)) if p else None


def _source_class_names(config) -> list[str]:
    """The class names of a run's training data ([] when it has none)."""
    try:
        from diffjax.data.captions import class_names

        d = config.data
        return class_names(d.source, name=d.name, data_dir=d.data_dir)
    except (ValueError, FileNotFoundError, KeyError, OSError):
        return []


def _load(labels):
    """(generator, model record, class names, batch kwargs, default batch size)."""
    overrides = dict(method=_METHOD.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value)
    if _PRETRAINED.value:
        from diffjax.pretrained import pipeline, safetensors_io

        pipe = pipeline.load_pipeline(_PRETRAINED.value, method=_METHOD.value)
        default_guidance = {"text": 7.5, "label": 4.0}.get(pipe.kind, 1.0)
        gen = pipeline.PretrainedGenerator(
            pipe,
            num_steps=_STEPS.value or 50,
            guidance=default_guidance if _GUIDANCE.value is None else _GUIDANCE.value,
        )
        sha = None
        for part in ("unet", "transformer"):
            d = os.path.join(_PRETRAINED.value, part)
            if os.path.isdir(d):
                sha = safetensors_io.weights_sha256(d)
                break
        model = {"kind": "pretrained", "path": _abspath(_PRETRAINED.value), "step": 0}
        model["sha256"] = sha
        extra = {"negative_prompt": _NEGATIVE.value} if pipe.kind == "text" else {}
        return gen, model, [], extra, 16
    if _NEGATIVE.value:
        raise ValueError("--negative_prompt applies to --pretrained only.")
    from diffjax import experiment, generate
    from diffjax.pretrained.frozen import tree_sha256

    if _WORKDIR.value:
        from diffjax.rundir import load_workdir_config

        config = load_workdir_config(_WORKDIR.value)
        experiment.require_diffusion(config, _WORKDIR.value, "make_dataset.py")
        gen = generate.Generator.from_workdir(
            _WORKDIR.value, step=_STEP.value, config=config, **overrides
        )
        kind, path = "workdir", _WORKDIR.value
    else:
        if _STEP.value is not None:
            raise ValueError("--step applies to --workdir; an export has one step.")
        gen = generate.Generator.from_export(_EXPORT_DIR.value, **overrides)
        kind, path = "export", _EXPORT_DIR.value
    model = {
        "kind": kind,
        "path": _abspath(path),
        "step": int(gen.step),
        "sha256": tree_sha256(gen.params),
    }
    return gen, model, _source_class_names(gen.config), {}, 256


def main(argv):
    del argv
    setup_logging()
    sources = [v for v in (_WORKDIR.value, _EXPORT_DIR.value, _PRETRAINED.value) if v]
    if len(sources) != 1:
        raise ValueError("Pass exactly one of --workdir, --export_dir or --pretrained.")
    if _LABELS.value and _PROMPTS.value:
        raise ValueError("Pass --labels or --prompts, not both.")
    labels = parse_labels(_LABELS.value)
    if labels == "none":
        raise ValueError(
            "--labels=none (the null class) makes an unlabelled set from a class-conditional "
            "model; use launch/sample.py for that, or pass class ids."
        )
    prompts = read_prompts(_PROMPTS.value) if _PROMPTS.value else None
    args = _args()
    early = {**args, "format": _FORMAT.value, "num_samples": _NUM.value}
    if _FORMAT.value == "array_record":
        early["name"] = _NAME.value or os.path.basename(os.path.normpath(_abspath(_OUT.value)))
    check_resume(_OUT.value, early)
    gen, model, class_names, extra, default_bs = _load(labels)
    if labels and gen.num_classes and _FORMAT.value == "folder":
        missing = sorted(set(range(gen.num_classes)) - set(labels))
        if missing:
            print(
                f"Note: --labels leaves out classes {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                "data.source='folder' numbers the class folders it finds 0..k-1, so its "
                "label ids will not be the model's. --format=array_record keeps them."
            )
    sc = gen.config.sample
    print(
        f"Writing {_NUM.value} samples of {model['kind']} {model['path']} (step {model['step']}; "
        f"{sc.get('method', '')} {sc.num_steps} steps, guidance {sc.guidance}) to {_OUT.value} "
        f"({_FORMAT.value})."
    )
    meta = write_dataset(
        gen,
        _OUT.value,
        num_samples=_NUM.value,
        args=args,
        model=model,
        fmt=_FORMAT.value,
        seed=_SEED.value,
        batch_size=_BATCH.value or default_bs,
        labels=labels,
        prompts=prompts,
        class_names=class_names,
        name=_NAME.value,
        batch_kwargs=extra,
    )
    where = _OUT.value
    if meta["format"] == "array_record":
        read = f"data.source='tfds' data.name={meta['args']['name']} data.data_dir={where}"
    else:
        read = f"data.source='folder' data.data_dir={where}"
    print(f"Done: {meta['done']} images in {where} ({meta['counts_by_folder']}). Read with {read}.")


def entry() -> None:
    """Console-script entry point (`diffjax-make-dataset`)."""
    run(main)
