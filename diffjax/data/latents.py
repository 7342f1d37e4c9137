"""Precomputed latents (and text embeddings) as a random-access source.

`data.source='latents'`, `data.data_dir` = either

* `FILE.npz` holding `latents` float [N, h, w, c] (already scaled for the model),
  optionally `labels` int [N], `context` [N, L, D] float embeddings or [N, L] int
  token ids, `context_mask` bool [N, L] (default: all True), and for sampling-time
  captions of classes `class_names` str [K] or `class_context` [K, L(, D)] +
  `class_context_mask` [K, L]; or
* a directory with the same arrays as `latents.npy`, `labels.npy`, ... .

Large data stays on disk: `.npy` files are memory-mapped, and so are the members of
an uncompressed `.npz` (`np.savez`, not `np.savez_compressed`), whose bytes lie
contiguously in the zip file; compressed members are read into memory. Nothing is
ever unpickled: an object array (which needs pickle) is refused with a message.

Records: `image` float32 [h, w, c] (the latent; the model sees it as its image),
`labels` int32, `context` float32 [L, D] or int32 [L], `context_mask` bool [L].
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

KEYS = (
    "latents",
    "labels",
    "context",
    "context_mask",
    "class_names",
    "class_context",
    "class_context_mask",
)


def _object_error(path: str, key: str) -> ValueError:
    return ValueError(
        f"{path}: array {key!r} has dtype object, which only pickle can read, and diffjax "
        "never unpickles data files. Save plain numeric arrays, e.g. "
        f"np.savez(path, {key}=np.asarray(x, np.float32))."
    )


def mmap_npz_member(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-maps an uncompressed .npy member of a zip file; None if not possible."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        # The local file header: 30 fixed bytes, then name and extra field (whose
        # lengths may differ from the central directory's copy, so read them here).
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject:
        raise _object_error(path, info.filename[: -len(".npy")])
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def load_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of a latents `.npz` file or `.npy` directory, memory-mapped if possible.

    Raises:
      FileNotFoundError: `path` is missing or holds no `latents`.
      ValueError: an array needs pickle (dtype object).
    """
    path = os.path.abspath(os.path.expanduser(path))
    arrays: dict[str, np.ndarray] = {}
    if os.path.isdir(path):
        for key in KEYS:
            file = os.path.join(path, key + ".npy")
            if os.path.isfile(file):
                try:
                    arrays[key] = np.load(file, mmap_mode="r", allow_pickle=False)
                except ValueError as e:
                    if "allow_pickle" in str(e) or "object" in str(e):
                        raise _object_error(file, key) from e
                    raise
    elif os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not an .npz file; data.source='latents' reads an .npz (np.savez) "
                "or a directory of .npy files."
            )
        with zipfile.ZipFile(path) as zf:
            members = {i.filename: i for i in zf.infolist()}
            for key in KEYS:
                info = members.get(key + ".npy")
                if info is None:
                    continue
                arr = mmap_npz_member(path, zf, info)
                if arr is None:
                    with np.load(path, allow_pickle=False) as npz:
                        try:
                            arr = npz[key]
                        except ValueError as e:
                            raise _object_error(path, key) from e
                arrays[key] = arr
    else:
        raise FileNotFoundError(
            f"Latents file {path!r} does not exist; set data.data_dir to an .npz file (or a "
            "directory of .npy files) with a 'latents' array [N, h, w, c]."
        )
    if "latents" not in arrays:
        raise FileNotFoundError(
            f"{path} has no 'latents' array (found: {sorted(arrays)}); save the latents "
            "[N, h, w, c] under the name 'latents'."
        )
    return arrays


def _check(path: str, a: dict[str, np.ndarray], max_text_len: int) -> None:
    lat = a["latents"]
    if lat.ndim != 4 or not np.issubdtype(lat.dtype, np.floating):
        raise ValueError(
            f"{path}: 'latents' must be float [N, h, w, c], got {lat.dtype} {lat.shape}."
        )
    n = lat.shape[0]
    if "labels" in a and (
        a["labels"].shape != (n,) or not np.issubdtype(a["labels"].dtype, np.integer)
    ):
        raise ValueError(
            f"{path}: 'labels' must be int [{n}], got {a['labels'].dtype} {a['labels'].shape}."
        )
    if "context_mask" in a and "context" not in a:
        raise ValueError(f"{path}: 'context_mask' without 'context'.")
    if "context" in a:
        ctx = a["context"]
        tokens = np.issubdtype(ctx.dtype, np.integer)
        if ctx.shape[0] != n or ctx.ndim != (2 if tokens else 3):
            raise ValueError(
                f"{path}: 'context' must be float embeddings [N={n}, L, D] or int token ids "
                f"[N={n}, L], got {ctx.dtype} {ctx.shape}."
            )
        if tokens and ctx.shape[1] != max_text_len:
            raise ValueError(
                f"{path}: token ids have length {ctx.shape[1]} but data.max_text_len="
                f"{max_text_len}; set data.max_text_len={ctx.shape[1]}."
            )
        if "context_mask" in a and a["context_mask"].shape != ctx.shape[:2]:
            raise ValueError(
                f"{path}: 'context_mask' must have shape {ctx.shape[:2]}, got "
                f"{a['context_mask'].shape}."
            )


class LatentSource:
    """Random-access records from precomputed latents (see the module docstring).

    Args:
      path: the `.npz` file or `.npy` directory.
      max_text_len: expected token length when `context` holds int token ids.
    """

    def __init__(self, path: str, *, max_text_len: int = 16):
        self._path = os.path.abspath(os.path.expanduser(path))
        self._max_text_len = int(max_text_len)
        self._open()

    def _open(self) -> None:
        self._arrays = load_arrays(self._path)
        _check(self._path, self._arrays, self._max_text_len)
        self._latents = self._arrays["latents"]
        self._labels = self._arrays.get("labels")
        self._context = self._arrays.get("context")
        self._mask = self._arrays.get("context_mask")

    # Pickling (grain worker processes) sends the path, not the arrays: a memmap
    # would otherwise be copied in full into every worker.
    def __getstate__(self) -> dict[str, Any]:
        return {"_path": self._path, "_max_text_len": self._max_text_len}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self._latents.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record: dict[str, Any] = {"image": np.asarray(self._latents[index], np.float32)}
        if self._labels is not None:
            record["labels"] = np.int32(self._labels[index])
        if self._context is not None:
            ctx = self._context[index]
            tokens = np.issubdtype(ctx.dtype, np.integer)
            record["context"] = np.asarray(ctx, np.int32 if tokens else np.float32)
            record["context_mask"] = (
                np.asarray(self._mask[index], bool)
                if self._mask is not None
                else np.ones(ctx.shape[0], bool)
            )
        return record

    def __repr__(self) -> str:
        extras = [k for k in ("labels", "context") if k in self._arrays]
        return (
            f"LatentSource(path={self._path!r}, n={len(self)}, "
            f"shape={tuple(self._latents.shape[1:])}, extras={extras})"
        )

    @property
    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else np.asarray(self._labels, np.int32)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array read from the file (memory-mapped where possible)."""
        return dict(self._arrays)


def make_latent_source(
    *, data_dir: str, max_text_len: int = 16, num_classes: int = 0, **unused: Any
) -> LatentSource:
    """`data.source='latents'`: builds a `LatentSource` from `config.data` fields.

    Raises if a label is outside [0, num_classes) when the config is class-conditional,
    or the file has no labels while `num_classes > 0`.
    """
    del unused
    if not data_dir:
        raise ValueError("data.source='latents' needs data.data_dir=<latents .npz or .npy dir>.")
    src = LatentSource(data_dir, max_text_len=max_text_len)
    if num_classes > 0 and src.labels is None:
        raise ValueError(
            f"data.num_classes={num_classes} but {data_dir} has no 'labels' array; set "
            "data.num_classes=0, or save labels [N] beside the latents."
        )
    if num_classes > 0 and len(src.labels):
        lo, hi = int(src.labels.min()), int(src.labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{data_dir}: labels span [{lo}, {hi}] but data.num_classes={num_classes}; "
                f"set data.num_classes={hi + 1} (and the model's)."
            )
    return src


def class_names(data_dir: str) -> list[str]:
    """The `class_names` array of a latents file: the names of labels 0..K-1.

    For captions made from labels at sampling time.
    """
    arrays = load_arrays(data_dir)
    if "class_names" not in arrays:
        raise ValueError(
            f"{data_dir} has no 'class_names' array, so class labels cannot be turned into "
            "captions; save class_names=np.array([...]) (str) beside the latents."
        )
    return [str(n) for n in np.asarray(arrays["class_names"])]


def class_context(data_dir: str, context_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-class text embeddings of a latents file.

    Args:
      data_dir: the latents `.npz` file or `.npy` directory.
      context_dim: D, the embedding width the model expects.

    Returns:
      `class_context` float32 [K, L, D] and `class_context_mask` bool [K, L] (all True
      when the file has no mask): the embedding of each class caption, index = label.
    """
    arrays = load_arrays(data_dir)
    if "class_context" not in arrays:
        raise ValueError(
            f"{data_dir} has no 'class_context' [K, L, D] array, so class labels cannot be "
            "turned into text embeddings; save the embedding of each class caption there "
            "(and 'class_context_mask' [K, L])."
        )
    ctx = np.asarray(arrays["class_context"], np.float32)
    if ctx.ndim != 3 or ctx.shape[-1] != context_dim:
        raise ValueError(
            f"{data_dir}: 'class_context' must be [K, L, {context_dim}], got {ctx.shape}."
        )
    mask = np.asarray(arrays.get("class_context_mask", np.ones(ctx.shape[:2], bool)), bool)
    if mask.shape != ctx.shape[:2]:
        raise ValueError(
            f"{data_dir}: 'class_context_mask' must be {ctx.shape[:2]}, got {mask.shape}."
        )
    return ctx, mask
