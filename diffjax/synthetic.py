"""A model's samples written as a dataset other runs train on (`launch/make_dataset.py`).

`write_dataset(gen, ...)` streams `gen.batches` (a `generate.Generator` or a
`pretrained.pipeline.PretrainedGenerator`) into an image folder or a tfds ArrayRecord
dataset, resumable after a kill (`OUT/meta.json`); the command's docstring
(`diffjax.cli.make_dataset`) describes the formats and the resume contract.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMATS = ("folder", "array_record")
META = "meta.json"
STAGING = ".staging"
META_VERSION = 1


def _safe(name: str) -> str:
    """`name` usable as one folder name (path separators and odd characters -> '_')."""
    out = re.sub(r"[^\w.\- ]", "_", str(name)).strip().lstrip(".")
    return out or "_"


def class_folders(class_names: Sequence[str], num_classes: int) -> list[str]:
    """Folder names of labels 0..K-1 that sort in label order (see the module docstring).

    The class names themselves when they are distinct, filesystem-safe and already
    sorted; else `<label>_<name>` (label zero-padded), or `<label>` without names.
    """
    names = [str(n) for n in class_names]
    width = len(str(max(num_classes - 1, 0)))
    if len(names) == num_classes and num_classes:
        if names == sorted(names) and len(set(names)) == len(names):
            if all(_safe(n) == n for n in names):
                return names
        return [f"{i:0{width}d}_{_safe(n)}" for i, n in enumerate(names)]
    return [f"{i:0{width}d}" for i in range(num_classes)]


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a prompts file, whitespace collapsed."""
    with open(path, encoding="utf-8") as f:
        prompts = [" ".join(line.split()) for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--prompts={path} holds no prompts (one per line).")
    return prompts


# ---------------------------------------------------------------------------- files


_TMP = re.compile(r"\.tmp\d+$")  # what `_atomic_bytes` writes before its os.replace


def _atomic_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: str, obj: dict) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------------------- writer


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} before, {b!r} now")
    return out


def _layout(gen, labels, prompts, class_names: Sequence[str]) -> dict:
    """Which labels, folders and captions the dataset has."""
    k = int(gen.num_classes)
    labelled = k > 0 and not prompts and not isinstance(labels, str)
    folders = class_folders(class_names, k) if labelled else []
    return {"labelled": labelled, "num_classes": k if labelled else 0, "folders": folders}


class Captions:
    """The caption of image i: `texts[i % len]` (prompts, cycled as the generator cycles
    them) or, for a text model drawing its classes, `texts[label]` (class captions)."""

    def __init__(self, texts: Sequence[str], by_index: bool):
        self.texts, self.by_index = list(texts), bool(by_index)

    def __call__(self, index: int, label: int) -> str:
        return self.texts[(index if self.by_index else label) % len(self.texts)]


def _captions(gen, prompts) -> Captions | None:
    """How images are captioned (None: a model without text)."""
    if prompts:
        return Captions(prompts, by_index=True)
    from diffjax import experiment

    config = gen.config
    if experiment.conditioning_kind(config) != "text" or not getattr(gen, "num_classes", 0):
        return None
    try:
        from diffjax.data.captions import class_caption_list

        return Captions(class_caption_list(config.data), by_index=False)
    except (ValueError, FileNotFoundError, KeyError):
        return None


def write_dataset(
    gen,
    out: str,
    *,
    num_samples: int,
    args: dict[str, Any],
    model: dict[str, Any],
    fmt: str = "folder",
    seed: int = 0,
    batch_size: int = 256,
    labels: Sequence[int] | str | None = None,
    prompts: Sequence[str] | None = None,
    class_names: Sequence[str] = (),
    name: str | None = None,
    batch_kwargs: dict | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Generates `num_samples` images with `gen` into the dataset `out` (resumable).

    Args:
      gen: a `Generator` or `PretrainedGenerator`.
      out: the dataset directory.
      num_samples: images to write.
      args: what must match on a resume (the command's arguments).
      model: the model's record (path, step, sha256); must match on a resume too.
      fmt: `folder` or `array_record`.
      seed, batch_size, labels, prompts: as for `gen.batches` (batch size rounded down
        to a multiple of the device count).
      class_names: names of labels 0..K-1 ([] = none).
      name: array_record: the tfds name (default: `out`'s basename).
      batch_kwargs: further `gen.batches` keywords (e.g. `negative_prompt`).
      stop_after: stop (raising `KeyboardInterrupt`, as a kill would) after this many
        new batches; tests use it.
      progress: show a progress bar.

    Returns:
      The final `meta.json` contents.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}.")
    out = os.path.abspath(os.path.expanduser(out))
    name = name or os.path.basename(os.path.normpath(out))
    if fmt == "array_record" and not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(
            f"The tfds dataset name {name!r} must be lowercase letters, digits and '_', "
            "starting with a letter; pass --name=... (or rename --out)."
        )
    ndev = int(gen.mesh.devices.size)
    bs = max(ndev, batch_size - batch_size % ndev)
    layout = _layout(gen, labels, prompts, class_names)
    captions = _captions(gen, prompts)
    args = {**args, "batch_size": bs, "format": fmt, "num_samples": int(num_samples)}
    if fmt == "array_record":
        args["name"] = name
    meta_path = os.path.join(out, META)
    # Only process 0 touches the files; the others learn where to start from it.
    is_main = _is_main()
    meta: dict = {}
    if is_main:
        meta = _start(out, meta_path, args, model, layout, class_names, captions, gen)
    done, complete = _from_main(meta.get("done", 0), meta.get("complete", False))
    if complete:
        print(f"{out} is already complete ({num_samples} images); nothing to do.")
        return meta
    if is_main:
        _remove_partial_files(out)
    width = len(str(num_samples - 1))
    num_batches = -(-num_samples // bs)
    first = done // bs
    counts = list(meta.get("counts", []))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, initial=first, desc="make_dataset", unit="batch")
    stream = gen.batches(
        num_samples,
        seed=seed,
        batch_size=bs,
        **({"labels": labels} if labels is not None else {}),
        **({"prompts": list(prompts)} if prompts else {}),
        **(batch_kwargs or {}),
        first_batch=first,
    )
    new = 0
    for b, (imgs, labs) in enumerate(stream, start=first):
        start = b * bs
        if is_main:
            if fmt == "folder":
                _write_folder_batch(out, imgs, labs, start, width, layout, captions)
            else:
                _write_staged_batch(out, b, imgs, labs, start, captions)
            if layout["labelled"]:
                for lab, c in zip(*np.unique(labs, return_counts=True), strict=True):
                    counts[int(lab)] += int(c)
            else:
                counts[0] += len(imgs)
            meta.update(done=min(num_samples, start + len(imgs)), counts=counts)
            meta["counts_by_folder"] = _by_folder(counts, layout)
            _write_json(meta_path, meta)
        if bar is not None:
            bar.update(1)
        new += 1
        if stop_after is not None and new >= stop_after and b + 1 < num_batches:
            raise KeyboardInterrupt(f"stopped after {new} batch(es) (stop_after)")
    if bar is not None:
        bar.close()
    if is_main:
        if fmt == "array_record":
            _build_tfds(out, name, num_batches, gen.image_shape, layout, class_names, captions)
        meta["complete"] = True
        _write_json(meta_path, meta)
        shutil.rmtree(os.path.join(out, STAGING), ignore_errors=True)
    return meta


def _remove_partial_files(out: str) -> None:
    """Deletes the temporary files of writes a kill interrupted (never renamed into place)."""
    for directory, dirnames, names in os.walk(out):
        dirnames[:] = [d for d in dirnames if d != "downloads"]
        for n in names:
            if _TMP.search(n):
                os.remove(os.path.join(directory, n))


def _from_main(done: int, complete: bool) -> tuple[int, bool]:
    """Process 0's (done, complete) on every process."""
    import jax

    if jax.process_count() == 1:
        return int(done), bool(complete)
    from jax.experimental import multihost_utils

    got = multihost_utils.broadcast_one_to_all(np.asarray([done, int(complete)], np.int64))
    return int(got[0]), bool(got[1])


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _by_folder(counts: list[int], layout: dict) -> dict[str, int]:
    if not layout["labelled"]:
        return {".": int(counts[0])}
    return {f: int(c) for f, c in zip(layout["folders"], counts, strict=True) if c}


def check_resume(out: str, args: dict[str, Any]) -> None:
    """Refuses at once (before any model is loaded) when `out/meta.json` records other
    values for the arguments in `args`; the rest are checked by `write_dataset`."""
    path = os.path.join(os.path.abspath(os.path.expanduser(out)), META)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        recorded = json.load(f).get("args", {})
    diff = _differences({k: recorded.get(k) for k in args}, args)
    if diff:
        raise ValueError(
            f"{out} was started with other arguments ({'; '.join(diff)}). Rerun with the "
            "recorded ones to finish it, or write to a new --out (or delete it)."
        )


def _start(out, meta_path, args, model, layout, class_names, captions, gen) -> dict:
    """The dataset's meta.json: read and checked against this run, or written new."""
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        diff = _differences(meta.get("args", {}), args) + _differences(
            {k: v for k, v in meta.get("model", {}).items() if k in ("path", "step", "sha256")},
            {k: v for k, v in model.items() if k in ("path", "step", "sha256")},
        )
        if diff:
            raise ValueError(
                f"{out} was started with other arguments ({'; '.join(diff)}). Rerun with the "
                "recorded ones to finish it, or write to a new --out (or delete it)."
            )
        return meta
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(
            f"{out} exists, is not empty and has no {META}: not a make_dataset directory. "
            "Choose a new or empty --out."
        )
    os.makedirs(out, exist_ok=True)
    sc = gen.config.sample
    meta = {
        "version": META_VERSION,
        "args": args,
        "model": model,
        "sampler": {
            "method": str(sc.get("method", "")),
            "num_steps": int(sc.num_steps),
            "guidance": float(sc.guidance),
        },
        "seed": args.get("seed"),
        "num_samples": args["num_samples"],
        "format": args["format"],
        "image_shape": [int(v) for v in gen.image_shape],
        "num_classes": layout["num_classes"],
        "class_names": [str(n) for n in class_names] if layout["labelled"] else [],
        "class_folders": layout["folders"],
        "captions": bool(captions),
        "counts": [0] * max(layout["num_classes"], 1),
        "counts_by_folder": {},
        "done": 0,
        "complete": False,
    }
    _write_json(meta_path, meta)
    return meta


def _write_folder_batch(out, imgs, labs, start, width, layout, captions) -> None:
    for j, (img, lab) in enumerate(zip(imgs, labs, strict=True)):
        directory = out
        if layout["labelled"]:
            directory = os.path.join(out, layout["folders"][int(lab)])
        os.makedirs(directory, exist_ok=True)
        stem = os.path.join(directory, f"{start + j:0{width}d}")
        if captions:
            _atomic_bytes(stem + ".txt", (captions(start + j, int(lab)) + "\n").encode())
        _atomic_bytes(stem + ".png", _png(img))


def _write_staged_batch(out, b, imgs, labs, start, captions) -> None:
    staging = os.path.join(out, STAGING)
    os.makedirs(staging, exist_ok=True)
    arrays = {"images": imgs, "labels": labs.astype(np.int64), "start": np.int64(start)}
    _atomic_bytes(os.path.join(staging, f"batch_{b:08d}.npz"), _npz(**arrays))


def _build_tfds(out, name, num_batches, image_shape, layout, class_names, captions) -> None:
    """The tfds ArrayRecord dataset `out/name/1.0.0` from the staged batches."""
    import tensorflow_datasets as tfds
    from PIL import Image

    staging = os.path.join(out, STAGING)
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)  # a killed build's leftovers
    features: dict[str, Any] = {"image": tfds.features.Image(shape=tuple(image_shape))}
    if layout["labelled"]:
        names = [str(n) for n in class_names] or layout["folders"]
        features["label"] = tfds.features.ClassLabel(names=names)
    if captions:
        features["caption"] = tfds.features.Text()

    ds_name = name

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = ds_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Samples written by diffjax's launch/make_dataset.py (meta.json).",
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True,  # record i = image i
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for b in range(num_batches):
                with np.load(os.path.join(staging, f"batch_{b:08d}.npz")) as z:
                    imgs, labs, start = z["images"], z["labels"], int(z["start"])
                for j, (img, lab) in enumerate(zip(imgs, labs, strict=True)):
                    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
                    ex: dict[str, Any] = {"image": pil}
                    if layout["labelled"]:
                        ex["label"] = int(lab)
                    if captions:
                        ex["caption"] = captions(start + j, int(lab))
                    yield start + j, ex

    builder = _Builder(data_dir=out, file_format="array_record")
    builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))


# ---------------------------------------------------------------------------- command
