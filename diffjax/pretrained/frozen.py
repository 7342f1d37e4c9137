"""Frozen pretrained components of a run: recorded by hash, checked on resume.

A latent model trains on latents of one VAE (`latent.vae`) and decodes its samples
through it; a run that resumed with another VAE would silently mix two latent spaces.
The first start records each frozen component's path and weights SHA-256 in
`WORKDIR/frozen.json`; a resume with a component whose weights differ is refused,
naming both hashes (a moved directory with the same weights is fine). A latents
directory made by `launch/encode_latents.py` must name the same VAE in its meta.json,
and the text encoder that made its caption embeddings is recorded (and checked) too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from diffjax.pretrained import safetensors_io
from diffjax.pretrained.pipeline import text_encoder_dir, vae_dir

FILE = "frozen.json"
log = logging.getLogger(__name__)


class FrozenComponentError(ValueError):
    """A frozen component differs from the one the run (or its data) was made with."""


def frozen_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{component: {path, sha256}} of the config's frozen components ({} for none)."""
    record = {}
    if config.latent.vae:
        directory = os.path.abspath(vae_dir(config.latent.vae))
        record["vae"] = {"path": directory, "sha256": safetensors_io.weights_sha256(directory)}
    if config.get("text", {}).get("encoder", ""):
        # Computes the captions' embeddings in the train step (diffjax.pretrained.stage).
        directory = text_encoder_dir(config.text.encoder)
        record["text_encoder"] = {
            "path": directory,
            "sha256": safetensors_io.weights_sha256(directory),
        }
    ae = config.get("autoencoder", {})
    if config.get("task", "") == "autoencoder" and ae.get("perceptual_weight", 0) > 0:
        # The LPIPS network of the perceptual loss (launch/convert_lpips.py).
        path = os.path.abspath(ae.perceptual_weights)
        record["lpips"] = {"path": path, "sha256": safetensors_io.weights_sha256(path)}
    if config.get("pretrained", ""):
        # The weights a fine-tune started from (provenance; a resume reads its checkpoints).
        directory = os.path.join(config.pretrained, "unet")
        record["pretrained_unet"] = {
            "path": directory,
            "sha256": safetensors_io.weights_sha256(directory),
        }
    if config.data.source == "latents":
        # Caption embeddings precomputed by encode_latents: the text encoder that made them.
        meta_path = os.path.join(config.data.data_dir, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                encoder = json.load(f).get("text_encoder")
            if encoder:
                record["text_encoder"] = {"path": encoder["path"], "sha256": encoder["sha256"]}
    return record


def tree_sha256(tree: Any) -> str:
    """SHA-256 over a params tree (sorted paths, float32 bytes): the record of a base that
    is not a file (a diffjax run's EMA params)."""
    h = hashlib.sha256()
    flat = traverse_util.flatten_dict(tree)
    for path in sorted(flat):
        h.update("/".join(map(str, path)).encode())
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(flat[path]), np.float32)).tobytes())
    return h.hexdigest()


def check_frozen(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resuming: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Checks the frozen components before any work; returns their record (for
    `write_frozen` once the workdir is prepared). `extra` adds entries the caller
    computed ({name: {path, sha256}}, e.g. a LoRA's base run).

    Raises:
      FrozenComponentError: a resumed run's component has other weights, or a latents
        data directory was encoded with another VAE.
    """
    record = {**frozen_record(config), **(extra or {})}
    path = os.path.join(workdir, FILE)
    if resuming and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for name in sorted(set(saved) | set(record)):
            old, new = saved.get(name), record.get(name)
            if (old or {}).get("sha256") != (new or {}).get("sha256"):
                raise FrozenComponentError(
                    f"{workdir} was trained with {name} {_describe(old)}, this config has "
                    f"{_describe(new)}. Resume with the original {name} (the VAE: "
                    "--config.latent.vae; caption embeddings: the latents directory they came "
                    "from; LPIPS: --config.autoencoder.perceptual_weights; a LoRA's base: "
                    "--config.base_workdir at the same checkpoint), or train into a new "
                    "workdir."
                )
    if record.get("vae") and config.data.source == "latents":
        from diffjax.pretrained.encode import META, check_latents_meta

        if os.path.isfile(os.path.join(config.data.data_dir, META)):
            try:
                check_latents_meta(config.data.data_dir, record["vae"]["path"])
            except ValueError as e:
                raise FrozenComponentError(str(e)) from e
        else:  # latents made by hand (or by another tool): nothing to check them against
            log.warning(
                "%s has no %s (launch/encode_latents.py writes one): cannot check that its "
                "latents come from the VAE %s.",
                config.data.data_dir,
                META,
                record["vae"]["path"],
            )
    return record


def write_frozen(workdir: str, record: dict[str, Any]) -> None:
    """Writes the record of a run's frozen components unless the run already has one."""
    path = os.path.join(workdir, FILE)
    if not record or os.path.exists(path):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _describe(entry: dict | None) -> str:
    if not entry:
        return "none"
    return f"{entry['path']} (SHA-256 {entry['sha256'][:12]}...)"
