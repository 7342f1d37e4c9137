"""Generating images from a run directory or an export: EMA params, batched sampling, save.

`Generator` pairs a model's params with a compiled `sample_fn` (`diffjax.sample_fn`,
which wraps the samplers of `diffjax.diffusion.samplers`) and draws uint8 images in
fixed-shape batches. Training's periodic evaluation, `launch/sample.py` and
`launch/evaluate.py` all draw through it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import experiment, export, images, parallel, rundir
from diffjax.sample_fn import cycle_labels, make_sample_fn


@dataclasses.dataclass
class Generator:
    """A model, its params and a compiled sampler, ready to draw uint8 images."""

    config: ml_collections.ConfigDict
    params: Any
    sample_fn: Any
    mesh: Any
    step: int

    @property
    def num_classes(self) -> int:
        return int(self.config.data.num_classes) if experiment.conditioning_kind(self.config) else 0

    @classmethod
    def from_workdir(
        cls,
        workdir: str,
        *,
        step: int | None = None,
        config: ml_collections.ConfigDict | None = None,
        method: str | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
    ) -> Generator:
        """EMA params of `workdir`'s latest good checkpoint (or `step`)."""
        config = config if config is not None else rundir.load_workdir_config(workdir)
        config = _with_sampling(config, method, num_steps, guidance)
        mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
        state, step, parts = rundir.load_state(config, workdir, mesh, step)
        sample_fn = make_sample_fn(
            parts.model.apply, parts.schedule, **experiment.sampler_kwargs(config)
        )
        return cls(
            config=config, params=state.ema_params, sample_fn=sample_fn, mesh=mesh, step=step
        )

    @classmethod
    def from_export(
        cls,
        export_dir: str,
        *,
        method: str | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        serialized: bool = False,
    ) -> Generator:
        """An export's params, with the model and sampler rebuilt from its config.json.

        Gives the same images as `from_workdir` on the exported run for the same seed.
        With `serialized=True` the `jax.export` artifact runs instead of diffjax's code
        (one device; the method and step count are those it was exported with).
        """
        meta, config = export.read_export(export_dir)
        config = _with_sampling(config, method, num_steps, guidance)
        model = experiment.build_model(config)
        params = export.load_params(export_dir, config, model)
        if serialized:
            if method is not None or num_steps is not None:
                raise ValueError(
                    "The serialized sampler has its method and step count built in; drop "
                    "--method/--steps or sample without --serialized."
                )
            exported = export.load_serialized(export_dir, meta)
            scale = jnp.float32(config.sample.guidance)

            def sample_fn(params, noise, cond, key):
                return exported.call(params, noise, cond, scale, jax.random.key_data(key))

        else:
            schedule = experiment.build_schedule(config)
            sample_fn = make_sample_fn(model.apply, schedule, **experiment.sampler_kwargs(config))
        mesh = (
            parallel.make_mesh(1, 1, devices=jax.local_devices()[:1])
            if serialized
            else (parallel.make_mesh(config.mesh.data, config.mesh.fsdp))
        )
        return cls(config=config, params=params, sample_fn=sample_fn, mesh=mesh, step=meta["step"])

    def generate(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draws `num_samples` images: (uint8 [N, H, W, C], labels int32 [N]).

        Labels cycle 0..K-1 for class-conditional models unless `labels` is given
        (then it is cycled to length N). The noise of image i depends only on `seed`
        and i's batch, so results do not depend on the device count.
        """
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        k = self.num_classes
        if labels is not None and len(labels):
            labels = np.resize(np.asarray(labels, np.int32), num_samples)
            if k and (labels.min() < 0 or labels.max() >= k):
                raise ValueError(
                    f"labels must lie in [0, {k - 1}], got {sorted(set(labels.tolist()))}."
                )
        else:
            labels = np.asarray(cycle_labels(num_samples, k))
        shape = experiment.image_shape(self.config)
        ndev = self.mesh.devices.size
        batch_size = max(ndev, batch_size - batch_size % ndev)
        sharding = parallel.batch_sharding(self.mesh)
        key = jax.random.key(seed)
        out = []
        batches = range(0, num_samples, batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="sample", unit="batch")
        for b, start in enumerate(batches):
            n = min(batch_size, num_samples - start)
            k_noise, k_sample = jax.random.split(jax.random.fold_in(key, b))
            # A fixed batch shape means one compilation; the tail is padded and dropped.
            noise = jax.random.normal(k_noise, (batch_size, *shape), jnp.float32)
            lab = np.resize(labels[start : start + n], batch_size)
            cond = experiment.sampling_condition(self.config, lab)
            noise, cond = jax.device_put((noise, cond), sharding)
            x = self.sample_fn(self.params, noise, cond, k_sample)
            out.append(images.to_uint8(parallel.gather(x))[:n])
        return np.concatenate(out), labels


def _with_sampling(config, method, num_steps, guidance):
    """A copy of `config` with the given sampling overrides (None keeps the run's)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if method is not None:
        config.sample.method = method
    if num_steps is not None:
        config.sample.num_steps = num_steps
    if guidance is not None:
        config.sample.guidance = guidance
    return config


def save_samples(
    path: str, imgs: np.ndarray, labels: np.ndarray, ncols: int | None = None
) -> tuple[str, str]:
    """Writes `images`/`labels` to `path` (.npz) and a PNG grid beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, images=imgs, labels=np.asarray(labels, np.int32))
    os.replace(tmp, path)
    png = path[: -len(".npz")] + ".png"
    images.save_grid(imgs[: min(len(imgs), 400)], png, ncols=ncols)
    return path, png
