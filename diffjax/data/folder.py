"""A folder of image files (with optional sidecar captions) as a random-access source.

Layout (`data.source='folder'`, `data.data_dir=ROOT`):

    ROOT/cat/001.png  ROOT/cat/001.txt  ROOT/dog/a.jpg ...   class sub-folders -> labels
    ROOT/001.png      ROOT/001.txt ...                       no sub-folders -> unlabelled

Image files are those with an extension in `diffjax.images.IMAGE_EXTENSIONS`.
Sorted sub-folder names become `labels` 0..K-1 (images inside a class folder are found
recursively). A `.txt` file with the same stem beside an image is its caption; when
any caption exists, every record carries `context` (int32 token ids [L], from
`diffjax.data.tokens.tokenize`) and `context_mask` (bool [L]); an image without a
caption gets the null caption (an all-False mask). Images are converted to `channels` (1 = L, 3 = RGB; transparency is
composited onto white), resized so the shorter side is `image_size` (Pillow bicubic,
antialiased when shrinking) and center-cropped to `image_size` x `image_size`.

ControlNet's "given" control images (`control_channels` > 0, `controlnet.control='given'`):

    ROOT/images/NAME.png   ROOT/images/NAME.txt   ROOT/control/NAME.png

The images, captions and class sub-folders live under `ROOT/images` (with the rules
above) and each image's control image under `ROOT/control` at the same relative path
and file stem (any image extension: `images/cat/001.jpg` pairs with
`control/cat/001.png`). A missing control file fails at start-up, naming it. The
control image goes through the same geometry as its image (resized to the image's
size if it differs with the same aspect ratio, then the shorter side to `image_size`,
the centre crop), with the same filter, Pillow bicubic: the image and its control
then sample the same positions with the same footprint, so edges stay aligned to the
sub-pixel, as in diffusers' ControlNet training script (which also resizes both with
one filter); a control already at `image_size` is only cropped, so binary maps stay
binary. Records carry `control` float32 [image_size, image_size, control_channels]
in [0, 1] (1 = L, 3 = RGB, converted as the image is).

The file index is built once, sorted, so every process and every restart sees the
same records in the same order. Every file is checked while indexing (in a thread
pool), so a bad file fails at start-up, naming it, rather than hours into a run:

* by default with `Image.verify()`, which reads headers and checksums but not the
  pixel data. It catches non-images and truncated PNG / WebP files; a truncated
  JPEG or BMP passes and fails when its record is read (again naming the file).
* with `skip_corrupt=True`, by decoding every file (JPEGs at reduced size via
  `draft`, so this costs about one epoch of decoding). Files that fail are left out
  of the index, so the length of the source is fixed before training starts and
  every kept file is known to decode; `num_skipped` and a warning give the count.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from diffjax.data.tokens import tokenize
from diffjax.images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    PIL_MODES,
    is_image_file,
    prepare_image,
    resize_center_crop,
    to_mode,
)

log = logging.getLogger(__name__)


def _list_images(directory: str, recursive: bool) -> list[str]:
    """Image paths under `directory`, sorted; hidden files and folders are skipped."""
    if not recursive:
        return sorted(
            os.path.join(directory, n)
            for n in os.listdir(directory)
            if is_image_file(n) and os.path.isfile(os.path.join(directory, n))
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, n) for n in filenames if is_image_file(n))
    return sorted(found)


def class_folders(root: str) -> list[str]:
    """Sorted names of the class sub-folders of `root` (label i = i-th name)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root!r} does not exist; set data.data_dir to a directory of "
            "images (or of class sub-folders of images)."
        )
    return sorted(
        n
        for n in os.listdir(root)
        if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
    )


def _check_file(path: str, decode_mode: str | None, size: int) -> str | None:
    """None if `path` passes the start-up check, else why it does not.

    `decode_mode` None: `Image.verify()` only; else a full decode in that mode (JPEGs
    drafted down towards `size`, which is how `__getitem__` decodes them too).
    """
    try:
        with Image.open(path) as img:
            if decode_mode is None:
                img.verify()
            else:
                img.draft(decode_mode, (size, size))
                img.load()
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def image_dir(root: str, given_control: bool = False) -> str:
    """Where a folder source's images (and class sub-folders, captions) live: `ROOT`,
    or `ROOT/images` in the layout with given control images (`ROOT/control`)."""
    return os.path.join(root, "images") if given_control else root


def _index_controls(control_root: str, image_root: str, paths: list[str]) -> list[str]:
    """The control file of every image path: same path relative to the roots, same stem.

    Raises naming the first missing file (and how many are missing).
    """
    by_stem: dict[str, list[str]] = {}
    for p in _list_images(control_root, recursive=True):
        by_stem.setdefault(os.path.splitext(os.path.relpath(p, control_root))[0], []).append(p)
    found, missing = [], []
    for path in paths:
        rel = os.path.relpath(path, image_root)
        same = os.path.join(control_root, rel)
        candidates = by_stem.get(os.path.splitext(rel)[0], [])
        if same in candidates:
            found.append(same)
        elif len(candidates) == 1:
            found.append(candidates[0])
        elif candidates:
            raise ValueError(
                f"Image {path} has several control files {candidates}; keep one per image "
                "(the same relative path and stem under ROOT/control)."
            )
        else:
            found.append("")
            missing.append(os.path.join(control_root, os.path.splitext(rel)[0] + ".png"))
    if missing:
        raise FileNotFoundError(
            f"No control image {missing[0]} for {paths[found.index('')]} ({len(missing)} of "
            f"{len(paths)} images have none). controlnet.control='given' reads "
            "ROOT/control/NAME.png (any image extension) beside each ROOT/images/NAME.png, "
            "class sub-folders mirrored; add the missing files, or train on a control "
            "transform of the images (controlnet.control='edges', 'tile', ...)."
        )
    return found


def _caption_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".txt"


def read_caption(image_path: str) -> str:
    """The sidecar caption of an image file, whitespace collapsed ('' when it has none)."""
    path = _caption_path(image_path)
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return " ".join(f.read().split())


class FolderSource:
    """Random-access records from a folder of images (see the module docstring).

    Args:
      root: the folder.
      image_size, channels: output shape [image_size, image_size, channels].
      skip_corrupt: leave unreadable files out of the index (and count them) instead
        of raising.
      max_text_len: caption token length L (used only when captions exist).
      tokenizer: "" (the word tokenizer) or a pretrained tokenizer directory
        (`diffjax.data.tokens.tokenize`).
      control_channels: 0 (no control images), or 1 / 3: read the given control images
        of `ROOT/control` (the images then live in `ROOT/images`; see the module
        docstring) as `control` with that many channels.
    """

    def __init__(
        self,
        root: str,
        *,
        image_size: int,
        channels: int,
        skip_corrupt: bool = False,
        max_text_len: int = 16,
        tokenizer: str = "",
        control_channels: int = 0,
    ):
        if channels not in PIL_MODES:
            raise ValueError(
                f"data.source='folder' makes 1- or 3-channel images, got data.channels={channels}."
            )
        if control_channels and control_channels not in PIL_MODES:
            raise ValueError(
                f"Given control images have 1 or 3 channels, got {control_channels}; set "
                "controlnet.conditioning_channels to 1, 3 or 0 (= data.channels)."
            )
        self._control_channels = int(control_channels)
        self._top = os.path.abspath(os.path.expanduser(root))
        self._root = image_dir(self._top, bool(self._control_channels))
        control_root = os.path.join(self._top, "control")
        if self._control_channels:
            for d in (self._root, control_root):
                if not os.path.isdir(d):
                    raise FileNotFoundError(
                        f"{d} does not exist. controlnet.control='given' reads ROOT/images/NAME.png "
                        "and its control image ROOT/control/NAME.png, with data.data_dir=ROOT "
                        f"(here {self._top})."
                    )
        self._image_size = int(image_size)
        self._channels = int(channels)
        self._max_text_len = int(max_text_len)
        self._tokenizer = tokenizer
        self._skip_corrupt = bool(skip_corrupt)

        classes = class_folders(self._root)
        loose = _list_images(self._root, recursive=False)
        if classes:
            if loose:
                raise ValueError(
                    f"{self._root} has class sub-folders {classes[:5]} and also images directly "
                    f"inside it (e.g. {os.path.basename(loose[0])}); move those into a class "
                    "folder, or point data.data_dir at a folder with only one kind."
                )
            paths, labels = [], []
            for label, name in enumerate(classes):
                found = _list_images(os.path.join(self._root, name), recursive=True)
                if not found:
                    raise ValueError(
                        f"Class folder {os.path.join(self._root, name)!r} holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images, since "
                        "labels are numbered by sorted folder name."
                    )
                paths.extend(found)
                labels.extend([label] * len(found))
        else:
            paths, labels = loose, []
        if not paths:
            raise ValueError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {self._root}; set "
                "data.data_dir to a folder of images or of class sub-folders."
            )

        controls = _index_controls(control_root, self._root, paths) if control_channels else []

        # Pillow releases the GIL while it reads and decodes, so threads overlap I/O.
        decode_mode = PIL_MODES[self._channels] if self._skip_corrupt else None
        named = list(paths)  # the file a record's failure names
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            reasons = list(pool.map(lambda p: _check_file(p, decode_mode, self._image_size), paths))
            if controls:
                # A record is kept only when its control file passes too.
                control_mode = PIL_MODES[self._control_channels] if self._skip_corrupt else None
                for i, reason in enumerate(
                    pool.map(lambda p: _check_file(p, control_mode, self._image_size), controls)
                ):
                    if reason is not None and reasons[i] is None:
                        named[i], reasons[i] = controls[i], reason
        keep = []
        self._skipped: list[str] = []
        for i, (path, reason) in enumerate(zip(named, reasons, strict=True)):
            if reason is None:
                keep.append(i)
            elif self._skip_corrupt:
                self._skipped.append(path)
            else:
                raise ValueError(
                    f"Cannot read image {path} ({reason}); delete or replace the file, or set "
                    "data.skip_corrupt=True to skip unreadable images."
                )
        if self._skipped:
            log.warning(
                "Skipped %d unreadable image(s) in %s (first: %s).",
                len(self._skipped),
                self._root,
                self._skipped[0],
            )
        if not keep:
            raise ValueError(f"Every image in {self._root} is unreadable.")
        self._paths = [paths[i] for i in keep]
        self._controls = [controls[i] for i in keep] if controls else []
        self._labels = np.asarray([labels[i] for i in keep], np.int32) if classes else None
        self._classes = classes
        self._captioned = any(os.path.isfile(_caption_path(p)) for p in self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self._paths[index]
        try:
            with Image.open(path) as img:
                img.draft(PIL_MODES[self._channels], (self._image_size, self._image_size))
                img.load()
                size = img.size  # after draft: the frame the control is resized to
                image = prepare_image(img, image_size=self._image_size, channels=self._channels)
            if self._control_channels:
                path = self._controls[index]
                control = self._read_control(path, size, self._paths[index])
        except DECODE_ERRORS as e:
            # Passed verify() at start-up but its pixel data is damaged (a truncated
            # JPEG, say); the index is fixed by now, so name the file and stop.
            raise ValueError(
                f"Cannot decode image {path} ({type(e).__name__}: {e}); delete or replace it, "
                "or set data.skip_corrupt=True to decode-check every file at start-up and "
                "skip the bad ones."
            ) from e
        record: dict[str, Any] = {"image": image}
        if self._control_channels:
            record["control"] = control
        if self._labels is not None:
            record["labels"] = self._labels[index]
        if self._captioned:
            ids, mask = tokenize([self.caption(index)], self._max_text_len, self._tokenizer)
            record["context"], record["context_mask"] = ids[0], mask[0]
        return record

    def _read_control(self, path: str, size: tuple[int, int], image_path: str) -> np.ndarray:
        """The control image at `path`, aligned with its image of (drafted) `size` (w, h):
        float32 [image_size, image_size, control_channels] in [0, 1]."""
        with Image.open(path) as img:
            img.load()
            ctrl = to_mode(img, self._control_channels)
        if ctrl.size != size:
            (cw, ch), (w, h) = ctrl.size, size
            # The same aspect ratio up to the rounding of one side to whole pixels.
            if abs(cw * h - ch * w) > max(cw, w) + max(ch, h):
                raise ValueError(
                    f"Control image {path} is {cw}x{ch} but its image {image_path} is {w}x{h} "
                    "(another aspect ratio), so they cannot be aligned; make the control "
                    "image the same size as its image."
                )
            ctrl = ctrl.resize(size, resample=Image.Resampling.BICUBIC)
        ctrl = resize_center_crop(ctrl, self._image_size)
        arr = np.asarray(ctrl, dtype=np.float32) / np.float32(255.0)
        return arr[..., None] if arr.ndim == 2 else arr

    def __repr__(self) -> str:
        control = f", control_channels={self._control_channels}" if self._control_channels else ""
        return (
            f"FolderSource(root={self._root!r}, n={len(self)}, classes={len(self._classes)}, "
            f"image_size={self._image_size}, channels={self._channels}, "
            f"captions={self._captioned}, max_text_len={self._max_text_len}{control})"
        )

    def caption(self, index: int) -> str:
        """The caption of record `index` ('' when it has none)."""
        return read_caption(self._paths[index])

    @property
    def paths(self) -> list[str]:
        """The indexed image files, in record order."""
        return list(self._paths)

    @property
    def control_paths(self) -> list[str]:
        """The given control image of each record, in record order ([] without them)."""
        return list(self._controls)

    @property
    def labels(self) -> np.ndarray | None:
        """int32 [N] labels, or None for an unlabelled folder."""
        return self._labels

    @property
    def class_names(self) -> list[str]:
        """Sorted class folder names (label i is `class_names[i]`); [] if unlabelled."""
        return list(self._classes)

    @property
    def captioned(self) -> bool:
        return self._captioned

    @property
    def num_skipped(self) -> int:
        """How many unreadable files `skip_corrupt=True` left out of the index."""
        return len(self._skipped)

    @property
    def skipped(self) -> list[str]:
        return list(self._skipped)


def folder_captions(root: str, count: int) -> list[str]:
    """The first `count` distinct non-empty captions of an unlabelled folder.

    In record order (sorted file names); sampling from a caption-conditioned model
    trained on such a folder asks for label i as the i-th of these captions.
    """
    found: list[str] = []
    for path in _list_images(os.path.abspath(os.path.expanduser(root)), recursive=False):
        text = read_caption(path)
        if text and text not in found:
            found.append(text)
            if len(found) == count:
                break
    return found


def make_folder_source(
    *,
    data_dir: str,
    image_size: int,
    channels: int,
    skip_corrupt: bool = False,
    max_text_len: int = 16,
    num_classes: int = 0,
    tokenizer: str = "",
    control_channels: int = 0,
    **unused: Any,
) -> FolderSource:
    """`data.source='folder'`: builds a `FolderSource` from `config.data` fields.

    Raises if the folder's class count differs from `num_classes` (more would collide
    with the null class; fewer leave classes the model never sees), or it has none while
    `num_classes > 0` (a class-conditional model would silently see only the null class).
    `control_channels` > 0 reads the given control images (`ROOT/images` + `ROOT/control`).
    """
    del unused
    if not data_dir:
        raise ValueError("data.source='folder' needs data.data_dir=<image folder>.")
    src = FolderSource(
        data_dir,
        image_size=image_size,
        channels=channels,
        skip_corrupt=skip_corrupt,
        max_text_len=max_text_len,
        tokenizer=tokenizer,
        control_channels=control_channels,
    )
    k = len(src.class_names)
    if num_classes > 0 and k == 0:
        raise ValueError(
            f"data.num_classes={num_classes} but {src._root} has no class sub-folders, so its "
            "images are unlabelled; set data.num_classes=0 (unconditional or caption-"
            "conditioned), or sort the images into one sub-folder per class."
        )
    if num_classes > 0 and k != num_classes:
        raise ValueError(
            f"{src._root} has {k} class folders but data.num_classes={num_classes}; set "
            f"data.num_classes={k} and model.kwargs.num_classes={k} (one class per folder)."
        )
    return src
