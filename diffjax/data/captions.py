"""Caption conditioning: the captioned digits source and sampling-time captions.

This module sits above the sources it wraps (`sources`, `folder`, `tfds_source`,
`latents`) and the data room's tokenizer (`tokens`); none of them imports it.

Raw captions (image-folder sidecar `.txt` files, captions made from labels) become
`context` int32 token ids [L] and `context_mask` bool [L] (True = real token), with
L = `data.max_text_len`, from `diffjax.data.tokens.tokenize` (the deterministic word
tokenizer of `diffjax.text`); the model's own text encoder
(`model.kwargs.text_vocab_size = TEXT_VOCAB_SIZE`) embeds them. An empty caption is
the null caption, an all-False mask, the same one classifier-free guidance trains with.

`data.source='digits_text'` is scikit-learn's digits with the caption
`caption_template.format(name=...)` ("a handwritten seven") and `labels` kept for
evaluation. `caption_condition(config, labels)` turns requested class labels into
those class captions at sampling time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax.data import folder, latents, tfds_source
from diffjax.data.dreambooth import CLASS_FILE
from diffjax.data.sources import DIGIT_NAMES, digits_source
from diffjax.data.tokens import NUM_BUCKETS, TEXT_VOCAB_SIZE, tokenize

DIGITS_TEMPLATE = "a handwritten {name}"


def class_captions(template: str, names: Sequence[str]) -> list[str]:
    """`template.format(name=names[i], label=i)` for every class i."""
    try:
        return [template.format(name=n, label=i) for i, n in enumerate(names)]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"data.caption_template={template!r} is not a valid template ({e}); use the "
            "fields {name} (class name) and {label} (class index)."
        ) from e


class DigitsTextSource:
    """scikit-learn digits with label captions: image, labels, context, context_mask.

    Args:
      split: `train`, `half0` or `half1` (as `digits_source`).
      caption_template: str.format template with `{name}` (zero..nine) / `{label}`.
      max_text_len: caption token length L.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        caption_template: str = DIGITS_TEMPLATE,
        max_text_len: int = 16,
    ):
        self._digits = digits_source(split)
        self._split = split
        self._template = caption_template or DIGITS_TEMPLATE
        self._max_text_len = int(max_text_len)
        self._captions = class_captions(self._template, DIGIT_NAMES)
        # Ten captions in all: tokenize them once.
        self._ids, self._mask = tokenize(self._captions, self._max_text_len)

    def __len__(self) -> int:
        return len(self._digits)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._digits[index]
        label = int(record["labels"])
        return {
            "image": record["image"],
            "labels": record["labels"],
            "context": self._ids[label],
            "context_mask": self._mask[label],
        }

    def __repr__(self) -> str:
        return (
            f"DigitsTextSource(split={self._split!r}, n={len(self)}, "
            f"template={self._template!r}, max_text_len={self._max_text_len})"
        )

    @property
    def labels(self) -> np.ndarray:
        return self._digits.labels

    @property
    def images(self) -> np.ndarray:
        return self._digits.images

    @property
    def captions(self) -> list[str]:
        """The caption of each class, index = label."""
        return list(self._captions)


def make_digits_text_source(
    *,
    split: str = "train",
    caption_template: str = "",
    max_text_len: int = 16,
    **unused: Any,
) -> DigitsTextSource:
    """`data.source='digits_text'` from `config.data` fields."""
    del unused
    return DigitsTextSource(
        split, caption_template=caption_template or DIGITS_TEMPLATE, max_text_len=max_text_len
    )


def class_names(source: str, *, name: str = "", data_dir: str = "") -> list[str]:
    """The class names of `config.data`'s dataset, for captions made from labels.

    digits / digits_text: zero..nine; tfds: the ClassLabel names; folder: the sorted
    class folder names; latents: the file's `class_names` array.
    """
    if source in ("digits", "digits_text"):
        return list(DIGIT_NAMES)
    if source == "tfds":
        return tfds_source.class_names(name, data_dir)
    if source == "folder":
        return folder.class_folders(data_dir)
    if source == "latents":
        return latents.class_names(data_dir)
    raise ValueError(f"data.source={source!r} has no class names to make captions from.")


def class_caption_list(d: ml_collections.ConfigDict) -> list[str]:
    """The caption of every class of `config.data` `d` (index = label)."""
    names = class_names(d.source, name=d.name, data_dir=d.data_dir)
    return class_captions(d.caption_template or default_template(d.source), names)


def _label_captions(config: ml_collections.ConfigDict, labels: np.ndarray) -> list[str]:
    """Caption of each class (index = label) for `config`'s data."""
    d = config.data
    if d.source == "folder" and config.get("controlnet", {}).get("control", "") == "given":
        # ControlNet's given control images: the images (classes, captions) live in
        # ROOT/images, beside ROOT/control.
        d = ml_collections.ConfigDict(
            {**d.to_dict(), "data_dir": folder.image_dir(d.data_dir, True)}
        )
    if d.source == "dreambooth":
        # The instance prompt, then the class images' prompts (the sample grid's rows).
        db = config.dreambooth
        found = [db.instance_prompt]
        path = os.path.join(db.class_dir, CLASS_FILE)
        if db.prior_loss_weight > 0 and os.path.isfile(path):
            with np.load(path) as f:
                found += [c for c in dict.fromkeys(str(c) for c in f["captions"])]
        count = int(labels.max()) + 1 if labels.size else 1
        return [found[i % len(found)] for i in range(max(count, len(found)))]  # cycled
    if d.source == "folder" and not folder.class_folders(d.data_dir):
        # Unlabelled but captioned: label i asks for the folder's i-th caption.
        count = int(labels.max()) + 1 if labels.size else 1
        found = folder.folder_captions(d.data_dir, count)
        if not found:
            raise ValueError(
                f"{d.data_dir} has neither class sub-folders nor caption files, so there "
                "is nothing to caption samples with."
            )
        return found
    return class_caption_list(d)


def default_template(source: str) -> str:
    return DIGITS_TEMPLATE if source in ("digits", "digits_text") else "{name}"


def caption_condition(
    config: ml_collections.ConfigDict, labels: np.ndarray | jax.Array
) -> dict[str, jax.Array]:
    """Model keyword arguments asking a text-conditioned model for classes `labels`.

    Label i asks for the caption `data.caption_template.format(name=class_names[i])`
    (see `class_names`); for an unlabelled, captioned image folder, for the folder's
    i-th distinct caption.

    Args:
      config: the experiment ConfigDict (reads `data.*` and `model.kwargs`).
      labels: int [N]; the value `data.num_classes` (the null class) gives the null
        caption.

    Returns:
      `context` and `context_mask` as jnp arrays: int32 token ids [N, L] and bool
      [N, L] (L = data.max_text_len) for a model with its own text encoder
      (`model.kwargs.text_vocab_size > 0`, or `text_encoder=True`); for a model fed
      precomputed embeddings (`context_dim > 0` only), float32 [N, L, D] and bool
      [N, L] gathered from the latents file's `class_context` / `class_context_mask`.
    """
    d = config.data
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    kwargs = config.model.kwargs
    vocab = int(kwargs.get("text_vocab_size", 0) or 0)
    if d.get("tokenizer", ""):
        # Token ids of a pretrained tokenizer; the frozen text encoder (text.encoder)
        # embeds them where the model is called. The null caption is "" (BOS EOS).
        captions = _label_captions(config, labels) + [""]
        table_ids, table_mask = tokenize(captions, d.max_text_len, d.tokenizer)
    elif vocab > 0 or kwargs.get("text_encoder", False):
        if 0 < vocab < TEXT_VOCAB_SIZE:
            raise ValueError(
                f"model.kwargs.text_vocab_size={vocab} is smaller than the caption tokenizer's "
                f"vocabulary; set it to diffjax.data.captions.TEXT_VOCAB_SIZE={TEXT_VOCAB_SIZE}."
            )
        captions = _label_captions(config, labels) + [""]  # last row: the null caption
        table_ids, table_mask = tokenize(captions, d.max_text_len)
    elif (kwargs.get("context_dim", 0) or kwargs.get("cross_attention_dim", 0)) > 0:
        dim = kwargs.get("context_dim", 0) or kwargs["cross_attention_dim"]
        table_ids, table_mask = _class_embeddings(d, int(dim))
    else:
        raise ValueError(
            "caption_condition needs a text-conditioned model (model.kwargs.text_vocab_size > 0 "
            "for captions as token ids, or context_dim > 0 for precomputed embeddings)."
        )
    k = table_ids.shape[0] - 1  # real classes; row k is the null caption
    null = (labels == d.num_classes) if d.num_classes > 0 else np.zeros(labels.shape, bool)
    bad = ~null & ((labels < 0) | (labels >= k))
    if bad.any():
        raise ValueError(
            f"labels must be class indices in [0, {k}) or the null class data.num_classes="
            f"{d.num_classes}; got {labels[bad][:5].tolist()}."
        )
    rows = np.where(null, k, labels)
    return {
        "context": jnp.asarray(table_ids[rows]),
        "context_mask": jnp.asarray(table_mask[rows]),
    }


def prompt_condition(config: ml_collections.ConfigDict, prompts: Sequence[str]) -> dict[str, Any]:
    """Token ids [P, L] + masks [P, L] (numpy) of `prompts`, for a model that reads
    captions as ids: its own text encoder, or a frozen one (`text.encoder`).

    Raises:
      ValueError: the model takes precomputed embeddings (no tokenizer to read prompts).
    """
    d, kwargs = config.data, config.model.kwargs
    if not (d.get("tokenizer", "") or kwargs.get("text_vocab_size", 0)):
        raise ValueError(
            "This model reads caption embeddings precomputed by encode_latents, so it has no "
            "text encoder to read prompts with; sample it with --labels (the latents "
            "directory's class captions)."
        )
    ids, mask = tokenize(list(prompts), d.max_text_len, d.get("tokenizer", ""))
    return {"context": ids, "context_mask": mask}


def _class_embeddings(
    d: ml_collections.ConfigDict, context_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class embeddings [K+1, L, D] + masks [K+1, L] (last row null) from a latents file."""
    if d.source != "latents":
        raise ValueError(
            "A model fed precomputed text embeddings (context_dim > 0, text_vocab_size=0) can "
            "only caption classes from a latents file with 'class_context'; set "
            f"model.kwargs.text_vocab_size={TEXT_VOCAB_SIZE} to caption from text."
        )
    ctx, mask = latents.class_context(d.data_dir, context_dim)
    null_ctx = np.zeros((1, *ctx.shape[1:]), np.float32)
    null_mask = np.zeros((1, ctx.shape[1]), bool)
    return np.concatenate([ctx, null_ctx]), np.concatenate([mask, null_mask])


__all__ = [
    "DIGITS_TEMPLATE",
    "DIGIT_NAMES",
    "NUM_BUCKETS",
    "TEXT_VOCAB_SIZE",
    "DigitsTextSource",
    "caption_condition",
    "class_captions",
    "class_names",
    "default_template",
    "make_digits_text_source",
    "prompt_condition",
    "tokenize",
]
