"""A dataset -> VAE latents (and captions -> text embeddings) for `data.source='latents'`.

    meta = encode_dataset("photos/", "latents/photos", vae="sd-v1-5",
                          text_encoder="sd-v1-5", image_size=512, batch_size=32)

`vae` is a diffusers pipeline directory (its `vae/` is used) or an `AutoencoderKL`
component directory (config.json + safetensors weights, from diffusers or exported by
a diffjax autoencoder run). `images` is an `.npz` with `images` uint8 [N, H, W, C]
(optional `labels` int [N], `captions` str [N], `class_names` str [K]), an image
folder (`diffjax.data.folder`: class sub-folders give labels, `.txt` files beside the
images give captions), or `tfds:NAME` (a prepared tfds dataset, `diffjax.data.
tfds_source`). Images are resized and center-cropped to `image_size` the way the data
sources do and go to the VAE as float32 NHWC in [-1, 1].

The output directory holds what `diffjax.data.latents` reads:

  latents.npy       float32 [N, h, w, c] = scaling_factor * (z - shift_factor), z the
                    posterior mode (its mean) or, with `sample=True`, a posterior draw
                    whose noise for example i comes from fold_in(key(seed), i), so it does
                    not depend on the batch size or the device count;
  labels.npy        int32 [N] when the images are labelled (+ class_names.npy [K] str
                    when the names are known);
  context.npy       with a text encoder: float32 [N, L, D], CLIP's last hidden state as
                    diffusers' Stable Diffusion uses it (an image without a caption gets
                    the encoding of "", SD's unconditional prompt), and context_mask.npy
                    bool [N, L] all True (SD attends to every position); captions without
                    a text encoder: int32 token ids [N, L] of `diffjax.data.tokens` with
                    their mask (all False = no caption);
  meta.json         VAE path and sha256, scaling/shift factors, mode or sample + seed,
                    image and latent shapes, count, source, text encoder path and sha256,
                    diffjax version (`read_meta`, `check_latents_meta`).

Rows are streamed to disk: each array's `.npy` header is written for the full [N, ...]
shape first (as `NAME.npy.partial`) and rows are filled batch by batch through a memory
map, so memory is bounded by the batch, not N. `progress.json` records how many rows are
complete, rewritten after every flushed batch; a rerun with the same arguments continues
from there, a rerun with other arguments is refused naming what differs. At the end the
`.partial` files are renamed and meta.json written, so a half-written directory is never
readable as latents; a finished directory is refused unless `overwrite=True`.

Batches are split over the mesh's batch axes (`diffjax.parallel.batch_sharding`), the
VAE and text encoder replicated; each process reads its own slice of every batch and
process 0 writes the files (a shared file system is assumed across hosts).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from diffjax import __version__, parallel
from diffjax.data import latents as latents_lib
from diffjax.data.folder import FolderSource
from diffjax.data.tokens import tokenize
from diffjax.images import resize_center_crop, to_mode, uint8_to_float
from diffjax.models import autoencoder_kl
from diffjax.pretrained import safetensors_io
from diffjax.pretrained.pipeline import Component, load_text_encoder, load_vae, vae_dir
from diffjax.text.clip_bpe import CLIPTokenizer

log = logging.getLogger(__name__)

META = "meta.json"
PROGRESS = "progress.json"
PARTIAL = ".partial"
# Every file this module writes into an output directory (what --overwrite removes).
ARRAYS = ("latents", "labels", "context", "context_mask", "class_names")


# ----------------------------------------------------------------------------- directories


def resolve_text_encoder_dirs(path: str) -> tuple[str, str]:
    """(text encoder dir, tokenizer dir) of a pipeline, or of a `text_encoder/` directory.

    A text encoder directory finds its CLIP tokenizer in itself (vocab.json + merges.txt
    or tokenizer.json) or in a sibling `tokenizer/` (the pipeline layout).
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--text_encoder={path} is not a directory; give a diffusers pipeline directory "
            "(text_encoder/ + tokenizer/) or a CLIPTextModel directory."
        )
    if os.path.isfile(os.path.join(path, "model_index.json")):
        enc, tok = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
        for d in (enc, tok):
            if not os.path.isdir(d):
                raise FileNotFoundError(
                    f"{path} is a pipeline without {os.path.basename(d)}/; give a text-to-"
                    "image pipeline (Stable Diffusion) or a CLIPTextModel directory."
                )
        return enc, tok
    tokenizer_files = ("vocab.json", "tokenizer.json")
    if any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        return path, path
    sibling = os.path.join(os.path.dirname(path), "tokenizer")
    if os.path.isdir(sibling):
        return path, sibling
    raise FileNotFoundError(
        f"{path} has no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json) and no "
        "sibling tokenizer/ directory; give the pipeline directory instead."
    )


# ----------------------------------------------------------------------------- images


@dataclasses.dataclass
class ImageSet:
    """Records to encode: `read(i)` -> {'image': float32 [H, W, C], 'labels'?, 'caption'?}."""

    description: str
    count: int
    shape: tuple[int, int, int]
    read: Callable[[int], dict[str, Any]]
    labelled: bool = False
    captioned: bool = False
    class_names: list[str] | None = None


def _npz_member(path: str, key: str) -> np.ndarray | None:
    """One array of an .npz, memory-mapped when stored uncompressed; never unpickled."""
    with zipfile.ZipFile(path) as zf:
        info = next((i for i in zf.infolist() if i.filename == key + ".npy"), None)
        if info is None:
            return None
        arr = latents_lib.mmap_npz_member(path, zf, info)
    if arr is None:  # compressed: read into memory
        with np.load(path, allow_pickle=False) as npz:
            try:
                arr = npz[key]
            except ValueError as e:
                raise ValueError(
                    f"{path}: array {key!r} needs pickle (dtype object), which diffjax never "
                    "reads; save plain arrays (str arrays for captions, not object)."
                ) from e
    return arr


def _open_npz(path: str, image_size: int | None, channels: int) -> ImageSet:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"--images={path} is not an .npz file (np.savez with 'images').")
    images = _npz_member(path, "images")
    if images is None:
        raise ValueError(f"{path} has no 'images' array; save uint8 [N, H, W, C] as 'images'.")
    return _array_set(
        f"npz:{path}",
        path,
        images,
        _npz_member(path, "labels"),
        _npz_member(path, "captions"),
        _npz_member(path, "class_names"),
        image_size,
        channels,
    )


def _array_set(
    description: str,
    path: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    captions: np.ndarray | None,
    names: np.ndarray | None,
    image_size: int | None,
    channels: int,
) -> ImageSet:
    """Images (+ labels, captions, class names) held as arrays, checked, as an ImageSet."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{path}: 'images' must be [N, H, W, C] with C in (1, 3, 4), got {images.shape}."
        )
    floating = np.issubdtype(images.dtype, np.floating)
    if images.dtype != np.uint8 and not floating:
        raise ValueError(
            f"{path}: 'images' must be uint8 (or float in [-1, 1]), got {images.dtype}."
        )
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError(f"{path} holds no images (an image count of zero).")
    size = (h, w) if image_size is None else (image_size, image_size)
    convert = c != channels or size != (h, w)
    if convert and floating:
        raise ValueError(
            f"{path}: float images {images.shape} would need resizing or a channel change to "
            f"{size[0]}x{size[1]}x{channels}; save them as uint8 instead."
        )
    if labels is not None and (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: 'labels' must be int [{n}], got {labels.dtype} {labels.shape}.")
    if captions is not None and (captions.shape != (n,) or captions.dtype.kind not in "US"):
        raise ValueError(
            f"{path}: 'captions' must be a str array [{n}], got {captions.dtype} {captions.shape}."
        )
    labels = None if labels is None else np.asarray(labels, np.int32)

    def read(i: int) -> dict[str, Any]:
        x = np.asarray(images[i])
        if not convert:
            image = uint8_to_float(x) if x.dtype == np.uint8 else x.astype(np.float32)
            if floating and (image.min() < -1.0 - 1e-5 or image.max() > 1.0 + 1e-5):
                raise ValueError(
                    f"{path}: float image {i} is outside [-1, 1] "
                    f"([{image.min():.3g}, {image.max():.3g}]); save uint8 or rescale."
                )
        else:
            img = to_mode(Image.fromarray(x[..., 0] if c == 1 else x), channels)
            if image_size is not None:
                img = resize_center_crop(img, image_size)
            image = uint8_to_float(np.asarray(img, np.uint8))
        record: dict[str, Any] = {"image": image}
        if labels is not None:
            record["labels"] = labels[i]
        if captions is not None:
            record["caption"] = " ".join(str(captions[i]).split())
        return record

    return ImageSet(
        description=description,
        count=n,
        shape=(size[0], size[1], channels),
        read=read,
        labelled=labels is not None,
        captioned=captions is not None,
        class_names=None if names is None else [str(s) for s in np.asarray(names)],
    )


def open_images(
    spec: str,
    *,
    channels: int,
    image_size: int | None = None,
    default_size: int = 256,
    data_dir: str = "",
    split: str = "train",
) -> ImageSet:
    """The records of `--images`: an `.npz`, an image folder, `tfds:NAME` or `digits`.

    Args:
      spec: the `--images` value.
      channels: the VAE's input channels (images are converted to them).
      image_size: resize (shorter side) and center-crop to this square size; None keeps
        an .npz's own size and uses `default_size` for folders and tfds.
      data_dir, split: the tfds data directory and split.
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image_size must be positive, got {image_size}.")
    if spec.startswith("tfds:"):
        from diffjax.data.tfds_source import TfdsSource

        name = spec[len("tfds:") :]
        size = image_size or default_size
        src = TfdsSource(name, split=split, data_dir=data_dir, image_size=size, channels=channels)
        if len(src) == 0:
            raise ValueError(f"tfds dataset {name!r} split {split!r} holds no images.")
        return ImageSet(
            description=repr(src),
            count=len(src),
            shape=(size, size, channels),
            read=lambda i: dict(src[i]),
            labelled=src.num_classes > 0,
            class_names=src.class_names or None,
        )
    if spec == "digits" or spec.startswith("digits:"):
        # The embedded 8x8 digits (scikit-learn): `digits`, `digits:half0`, `digits:half1`.
        from diffjax.data.sources import digits_source

        src = digits_source(spec.partition(":")[2] or "train")
        images = np.round((src.images + 1.0) * 127.5).astype(np.uint8)
        names = np.asarray([str(k) for k in range(10)])
        return _array_set(repr(src), spec, images, src.labels, None, names, image_size, channels)
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        size = image_size or default_size
        folder = FolderSource(path, image_size=size, channels=channels)

        def read(i: int) -> dict[str, Any]:
            rec = folder[i]
            out = {"image": rec["image"], "caption": folder.caption(i)}
            if "labels" in rec:
                out["labels"] = rec["labels"]
            return out

        return ImageSet(
            description=f"folder:{path}",
            count=len(folder),
            shape=(size, size, channels),
            read=read,
            labelled=folder.labels is not None,
            captioned=folder.captioned,
            class_names=folder.class_names or None,
        )
    if os.path.isfile(path):
        return _open_npz(path, image_size, channels)
    raise FileNotFoundError(
        f"--images={spec}: no such file or directory; give an .npz with 'images' uint8 "
        "[N, H, W, C], a folder of images (or of class sub-folders), or tfds:NAME."
    )


# ----------------------------------------------------------------------------- the encoder


_INPUTS = ("image", "index", "ids")  # what the jitted step reads of a batch


@functools.lru_cache(maxsize=8)
def _step_fn(vae_mod: Any, text_mod: Any) -> Callable:
    """The jitted batch step of a VAE (+ text encoder); cached so reruns reuse compilations."""
    scale, shift = float(vae_mod.scaling_factor), float(vae_mod.shift_factor or 0.0)

    def step(params, seed, batch, sample):
        vae_params, text_params = params
        mean, logvar = vae_mod.apply({"params": vae_params}, batch["image"], method=vae_mod.encode)
        z = mean
        if sample:
            # Row i's noise depends only on (seed, i): not on the batch or the devices.
            base = jax.random.key(seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(batch["index"])
            z = jax.vmap(autoencoder_kl.latent_sample)(mean, logvar, keys)
        out = {"latents": autoencoder_kl.to_latents(z, scale, shift)}
        if text_mod is not None:
            hidden = text_mod.apply({"params": text_params}, batch["ids"])
            out["context"] = hidden["last_hidden_state"].astype(jnp.float32)
        return out

    return jax.jit(step, static_argnames="sample")


class Encoder:
    """The jitted per-batch encode: images (+ token ids) -> model latents (+ embeddings).

    Args:
      vae: the `AutoencoderKL` component (`pipeline.load_vae`).
      text_encoder: a CLIP text encoder component, or None.
      mesh: the device mesh (default: every device on the data axis).
      batch_size: rows per call, rounded up to a multiple of the device count.
    """

    def __init__(
        self,
        vae: Component,
        text_encoder: Component | None = None,
        *,
        mesh: Any = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch_size must be positive, got {batch_size}.")
        self.mesh = mesh if mesh is not None else parallel.make_mesh(-1, 1)
        ndev = self.mesh.devices.size
        self.batch_size = -(-batch_size // ndev) * ndev
        if self.batch_size % jax.process_count():
            raise ValueError(
                f"batch size {self.batch_size} must divide over {jax.process_count()} processes."
            )
        self.vae = vae
        self.scaling_factor = float(vae.module.scaling_factor)
        self.shift_factor = float(vae.module.shift_factor or 0.0)
        self._step = _step_fn(vae.module, None if text_encoder is None else text_encoder.module)
        text_params = None if text_encoder is None else text_encoder.params
        self.params = jax.device_put((vae.params, text_params), parallel.replicated(self.mesh))

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """[h, w, c] of the latents of an image [H, W, C]."""
        mod = self.vae.module
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        mean, _ = jax.eval_shape(
            lambda p, x: mod.apply({"params": p}, x, method=mod.encode), self.vae.params, x
        )
        return tuple(mean.shape[1:])

    def __call__(
        self, batch: dict[str, np.ndarray], *, sample: bool = False, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """This process's rows of one global batch -> the whole batch's outputs (numpy).

        `batch`: 'image' float32 [b, H, W, C] in [-1, 1], 'index' int32 [b] (global row
        numbers, the posterior noise keys), 'ids' int32 [b, L] with a text encoder; b is
        `batch_size / process_count`. 'labels', 'context' (token ids) and 'context_mask'
        are returned as given, gathered over processes.
        """
        inputs = {k: v for k, v in batch.items() if k in _INPUTS}
        out = self._step(
            self.params,
            np.int32(seed),
            parallel.global_batch(inputs, self.mesh),
            sample=bool(sample),
        )
        out = parallel.gather(out)
        rest = {k: v for k, v in batch.items() if k not in _INPUTS}
        if jax.process_count() > 1:  # every process's rows of them (no compilation)
            rest = parallel.gather(parallel.global_batch(rest, self.mesh))
        return {**rest, **out}


def encode_images(
    vae: Component,
    images: np.ndarray,
    *,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    mesh: Any = None,
) -> np.ndarray:
    """In-memory images float [N, H, W, C] in [-1, 1] -> model latents float32 [N, h, w, c].

    `scaling_factor * (mean - shift_factor)`, or a posterior draw (row i's noise from
    fold_in(key(seed), i)) with `sample=True`. Single-process; see `encode_dataset` for
    datasets on disk.
    """
    images = np.asarray(images, np.float32)
    enc = Encoder(vae, mesh=mesh, batch_size=min(batch_size, max(1, len(images))))
    b = enc.batch_size
    parts = []
    for start in range(0, len(images), b):
        x = images[start : start + b]
        n = len(x)
        x = np.concatenate([x, np.zeros((b - n, *x.shape[1:]), np.float32)])
        index = np.arange(start, start + b, dtype=np.int32)
        parts.append(enc({"image": x, "index": index}, sample=sample, seed=seed)["latents"][:n])
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- output files


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass --overwrite to start over.") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object; pass --overwrite to start over.")
    return obj


def _our_files(out_dir: str) -> list[str]:
    names = [META, PROGRESS]
    for a in ARRAYS:
        names += [f"{a}.npy", f"{a}.npy{PARTIAL}"]
    return [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n))]


def _differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} then, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _refuse_finished(out_dir: str) -> None:
    """Raises if `out_dir` is a file or holds a finished encode."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out={out_dir} is a file; give a directory.")
    meta, progress = os.path.join(out_dir, META), os.path.join(out_dir, PROGRESS)
    if os.path.isfile(meta) and not os.path.isfile(progress):
        done = _read_json(meta).get("count", "?")
        raise ValueError(
            f"{out_dir} already holds finished latents ({done} rows, meta.json); pass "
            "--overwrite to encode again, or choose another --out."
        )


def _start_row(out_dir: str, arguments: dict, overwrite: bool) -> int:
    """Rows already encoded in `out_dir` by a run with the same `arguments` (0 if fresh)."""
    if not overwrite:
        _refuse_finished(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if overwrite:
        for path in _our_files(out_dir):
            os.remove(path)
        return 0
    progress = os.path.join(out_dir, PROGRESS)
    if os.path.isfile(progress):
        state = _read_json(progress)
        diffs = _differences(state.get("arguments", {}), arguments)
        if diffs:
            raise ValueError(
                f"{out_dir} holds an unfinished encode ({state.get('rows_done', 0)} of "
                f"{state.get('arguments', {}).get('count', '?')} rows) made with other "
                f"arguments ({'; '.join(diffs)}); rerun with the same arguments to continue, or "
                "pass --overwrite to start over."
            )
        return int(state["rows_done"])
    if _our_files(out_dir):
        found = [os.path.basename(p) for p in _our_files(out_dir)]
        raise ValueError(
            f"{out_dir} already holds {found} but no {PROGRESS} of an unfinished encode; pass "
            "--overwrite to replace them, or choose another --out."
        )
    return 0


def _open_arrays(
    out_dir: str, specs: dict[str, tuple[Any, tuple[int, ...]]], fresh: bool
) -> dict[str, np.memmap]:
    arrays = {}
    for name, (dtype, shape) in specs.items():
        path = os.path.join(out_dir, f"{name}.npy{PARTIAL}")
        if fresh:
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            continue
        if not os.path.isfile(path):
            raise ValueError(
                f"{out_dir}: {PROGRESS} says rows were written but {os.path.basename(path)} is "
                "missing; pass --overwrite to start over."
            )
        arr = np.lib.format.open_memmap(path, mode="r+")
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise ValueError(
                f"{path} is {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}; pass "
                "--overwrite to start over."
            )
        arrays[name] = arr
    return arrays


# ----------------------------------------------------------------------------- the dataset


def _host_batches(
    images: ImageSet, start: int, batch_size: int, fields: Callable[[list[dict]], dict]
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yields (first row, real rows, this process's rows of the batch's device inputs).

    Every batch has `batch_size` rows (one compilation): the tail repeats the last record
    and the caller drops the extras. Each process reads only its own rows; the next batch
    is read while the current one encodes.
    """
    nproc, pid = jax.process_count(), jax.process_index()
    local = batch_size // nproc

    def load(first: int):
        rows = np.arange(first, first + batch_size, dtype=np.int32)[pid * local : (pid + 1) * local]
        records = list(pool.map(images.read, np.minimum(rows, images.count - 1).tolist()))
        batch = {"image": np.stack([r["image"] for r in records]).astype(np.float32), "index": rows}
        batch.update(fields(records))
        return first, min(batch_size, images.count - first), batch

    with (
        ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool,
        ThreadPoolExecutor(max_workers=1) as ahead,
    ):
        firsts = list(range(start, images.count, batch_size))
        pending = ahead.submit(load, firsts[0]) if firsts else None
        for i in range(len(firsts)):
            current = pending.result()
            pending = ahead.submit(load, firsts[i + 1]) if i + 1 < len(firsts) else None
            yield current


def encode_dataset(
    images: str,
    out_dir: str,
    *,
    vae: str,
    text_encoder: str | None = None,
    captions: bool = False,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int | None = None,
    data_dir: str = "",
    split: str = "train",
    max_text_len: int = 16,
    overwrite: bool = False,
    mesh: Any = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> dict | None:
    """Encodes `images` into `out_dir` (see the module docstring for both).

    Args:
      images: `FILE.npz`, an image folder, or `tfds:NAME`.
      out_dir: the output directory (created).
      vae: a pipeline directory or an AutoencoderKL directory.
      text_encoder: a pipeline directory or a CLIP text encoder directory: captions are
        encoded to its last hidden state (implies `captions`).
      captions: keep the images' captions; without `text_encoder` as token ids of
        `diffjax.data.tokens` of length `max_text_len`.
      sample: draw from the posterior instead of taking its mode.
      seed: the posterior draw's seed (recorded in meta.json).
      batch_size: images per device call, rounded up to a multiple of the device count;
        it does not change the result, so a resumed run may use another one.
      image_size: resize and center-crop to this size (default: an .npz's own size, the
        VAE's `sample_size` for folders and tfds).
      data_dir, split: tfds data directory and split.
      overwrite: replace a finished (or unfinished) encode in `out_dir`.
      mesh: the device mesh (default: all devices on the data axis).
      progress: show a progress bar (process 0).
      max_batches: stop after this many batches, leaving a resumable directory (tests).

    Returns:
      The meta.json contents, or None when `max_batches` stopped the run early.

    Raises:
      FileNotFoundError / ValueError naming the bad input and its fix.
    """
    if not 0 <= seed < 2**31:
        raise ValueError(f"--seed must lie in [0, 2**31), got {seed}.")
    if not overwrite:  # before reading a large dataset
        _refuse_finished(out_dir)
    vae_path = vae_dir(vae)
    vae_cfg = safetensors_io.read_config(vae_path)
    f = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)
    size = vae_cfg.get("sample_size", 256)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    channels = int(vae_cfg.get("in_channels", 3))
    imgs = open_images(
        images,
        channels=channels,
        image_size=image_size,
        default_size=size,
        data_dir=data_dir,
        split=split,
    )
    h, w, _ = imgs.shape
    if h % f or w % f:
        good = max(f, (min(h, w) // f) * f)
        raise ValueError(
            f"images are {h}x{w} but this VAE ({vae_path}) downsamples by {f}, so both sides must "
            f"be multiples of {f}; pass --image_size={good} (or another multiple of {f})."
        )
    captions = captions or bool(text_encoder)
    if captions and not imgs.captioned:
        raise ValueError(
            f"--captions / --text_encoder: {imgs.description} has no captions (.txt files beside "
            "folder images, or a 'captions' str array in an .npz); drop those flags, or add "
            "captions."
        )

    te_dirs = resolve_text_encoder_dirs(text_encoder) if text_encoder else None
    vae_hash = safetensors_io.weights_sha256(vae_path)
    te_hash = safetensors_io.weights_sha256(te_dirs[0]) if te_dirs else None
    arguments = {
        "source": imgs.description,
        "count": imgs.count,
        "image_shape": list(imgs.shape),
        "vae": vae_path,
        "vae_sha256": vae_hash,
        "latents": "sample" if sample else "mode",
        "seed": seed if sample else None,
        "text_encoder": te_dirs[0] if te_dirs else None,
        "text_encoder_sha256": te_hash,
        "captions": ("embeddings" if te_dirs else "token_ids") if captions else None,
        "max_text_len": max_text_len if captions and not te_dirs else None,
    }
    main = jax.process_index() == 0
    start = _start_row(out_dir, arguments, overwrite) if main else 0
    if jax.process_count() > 1:  # every process continues where process 0 does
        from jax.experimental import multihost_utils

        start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))

    vae_c = load_vae(vae_path)
    tokenizer, te_c = None, None
    if te_dirs:
        te_c = load_text_encoder(te_dirs[0])
        tokenizer = CLIPTokenizer.from_dir(te_dirs[1])
    enc = Encoder(vae_c, te_c, mesh=mesh, batch_size=batch_size)
    latent_shape = enc.latent_shape(imgs.shape)
    n = imgs.count
    specs: dict[str, tuple[Any, tuple[int, ...]]] = {"latents": (np.float32, (n, *latent_shape))}
    if imgs.labelled:
        specs["labels"] = (np.int32, (n,))
    if te_c is not None:
        length = tokenizer.max_len
        specs["context"] = (np.float32, (n, length, int(te_c.config["hidden_size"])))
        specs["context_mask"] = (np.bool_, (n, length))
    elif captions:
        specs["context"] = (np.int32, (n, max_text_len))
        specs["context_mask"] = (np.bool_, (n, max_text_len))

    def fields(records: list[dict]) -> dict[str, np.ndarray]:
        """Per-row inputs besides the image; all but `ids` pass through to the output."""
        out = {}
        texts = [r.get("caption", "") for r in records]
        if imgs.labelled:
            out["labels"] = np.asarray([r["labels"] for r in records], np.int32)
        if tokenizer is not None:
            out["ids"], _ = tokenizer.encode(texts)
            out["context_mask"] = np.ones((len(records), tokenizer.max_len), bool)
        elif captions:
            out["context"], out["context_mask"] = tokenize(texts, max_text_len)
        return out

    log.info(
        "Encoding %d images %s from %s with %s (%s) -> %s, latents %s, starting at row %d.",
        n,
        imgs.shape,
        imgs.description,
        vae_path,
        arguments["latents"],
        out_dir,
        latent_shape,
        start,
    )
    if start < n:
        arrays = _open_arrays(out_dir, specs, fresh=start == 0) if main else {}
        if main and start == 0:
            _write_json(os.path.join(out_dir, PROGRESS), {"rows_done": 0, "arguments": arguments})
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=start, desc="encode", unit="img", dynamic_ncols=True)
        try:
            for done_batches, (first, real, batch) in enumerate(
                _host_batches(imgs, start, enc.batch_size, fields)
            ):
                if max_batches is not None and done_batches >= max_batches:
                    return None
                out = enc(batch, sample=sample, seed=seed)
                if main:
                    for name, arr in arrays.items():
                        arr[first : first + real] = out[name][:real]
                        arr.flush()
                    _write_json(
                        os.path.join(out_dir, PROGRESS),
                        {"rows_done": first + real, "arguments": arguments},
                    )
                if bar is not None:
                    bar.update(real)
        finally:
            if bar is not None:
                bar.close()
            del arrays
    meta = {
        "diffjax_version": __version__,
        "count": n,
        "latent_shape": list(latent_shape),
        "image_shape": list(imgs.shape),
        "image_size": image_size,
        "source": imgs.description,
        "labels": imgs.labelled,
        "vae": {"path": vae_path, "sha256": vae_hash},
        "scaling_factor": enc.scaling_factor,
        "shift_factor": enc.shift_factor,
        "latents": arguments["latents"],
        "seed": arguments["seed"],
        "text_encoder": (
            {"path": te_dirs[0], "tokenizer": te_dirs[1], "sha256": te_hash} if te_dirs else None
        ),
        "captions": arguments["captions"],
        "max_text_len": arguments["max_text_len"],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if main:
        _finish(out_dir, specs, imgs.class_names, meta)
    return meta


def _finish(out_dir: str, specs: dict, class_names: list[str] | None, meta: dict) -> None:
    """Renames the .partial arrays, writes class_names and meta.json, drops progress.json."""
    for name in specs:
        partial = os.path.join(out_dir, f"{name}.npy{PARTIAL}")
        if os.path.isfile(partial):
            os.replace(partial, os.path.join(out_dir, f"{name}.npy"))
    if class_names:
        np.save(os.path.join(out_dir, "class_names.npy"), np.asarray(class_names, dtype=str))
    _write_json(os.path.join(out_dir, META), meta)
    os.remove(os.path.join(out_dir, PROGRESS))


# ----------------------------------------------------------------------------- checks


def read_meta(data_dir: str) -> dict:
    """The meta.json of a latents directory made by `encode_dataset`."""
    path = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), META)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir} has no {META}, so the VAE its latents came from is unknown; make the "
            "directory with `python launch/encode_latents.py --vae=DIR --images=... "
            f"--out={data_dir}`."
        )
    return _read_json(path)


def check_latents_meta(data_dir: str, vae_path: str) -> None:
    """Raises unless the latents in `data_dir` were encoded by the VAE in `vae_path`.

    Compares the sha256 of the weight files and the scaling/shift factors of the VAE's
    config.json with those meta.json recorded. `vae_path` is a pipeline or VAE directory.

    Raises:
      FileNotFoundError: no meta.json, or no VAE at `vae_path`.
      ValueError: another VAE (or other factors) made the latents; names both.
    """
    meta = read_meta(data_dir)
    vae = vae_dir(vae_path)
    have = meta.get("vae") or {}
    want = safetensors_io.weights_sha256(vae)
    if have.get("sha256") != want:
        raise ValueError(
            f"{data_dir} was encoded with the VAE {have.get('path')} (weights sha256 "
            f"{have.get('sha256')}) but the config names {vae} (sha256 {want}); re-encode with "
            f"`python launch/encode_latents.py --vae={vae_path} ... --out=DIR --overwrite`, or "
            f"name the VAE {have.get('path')}."
        )
    model = autoencoder_kl.from_diffusers_config(safetensors_io.read_config(vae))
    for name, value in (
        ("scaling_factor", float(model.scaling_factor)),
        ("shift_factor", float(model.shift_factor or 0.0)),
    ):
        if meta.get(name) is not None and not np.isclose(float(meta[name]), value, rtol=1e-6):
            raise ValueError(
                f"{data_dir} was encoded with {name}={meta[name]} but {vae}/config.json has "
                f"{name}={value} (same weights); re-encode with --overwrite, or restore the config."
            )
