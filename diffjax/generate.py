"""Generating images from a run directory or an export: EMA params, batched sampling, save.

`Generator` pairs a model's params with a compiled `sample_fn` (`diffjax.sample_fn`,
which wraps the samplers of `diffjax.diffusion.samplers`) and draws uint8 images in
fixed-shape batches. Training's periodic evaluation, `launch/sample.py` and
`launch/evaluate.py` all draw through it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import experiment, export, images, parallel, rundir
from diffjax.data.captions import prompt_condition
from diffjax.diffusion import editing
from diffjax.sample_fn import Edit, index_batches, make_invert_fn, make_sample_fn, noise_batches


@dataclasses.dataclass
class Generator:
    """A model, its params and a compiled sampler, ready to draw uint8 images."""

    config: ml_collections.ConfigDict
    params: Any
    sample_fn: Any
    mesh: Any
    step: int
    # Latent models: the frozen VAE that turns samples into images (`latent.vae`).
    decoder: Any = None
    # Runs with a frozen text encoder (`text.encoder`): caption ids -> embeddings, and the
    # encoded "" as the unconditional branch of guidance (`diffjax.pretrained.stage`).
    stage: Any = None
    # The model's `apply` and schedule, from which editing and inversion build their
    # compiled functions (None for a serialized export, which only samples).
    apply_fn: Any = None
    schedule: Any = None
    _edit_fns: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape [H, W, C] of the uint8 images this generator yields."""
        shape = experiment.image_shape(self.config)
        return shape if self.decoder is None else self.decoder.image_shape(shape)

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
        stage = text_stage(config, mesh)
        text = None if stage is None else stage.params.get("text_encoder")
        state, step, parts = rundir.load_state(config, workdir, mesh, step, text_params=text)
        params = state.ema_params
        if parts.base_sharding is not None:  # a LoRA's merged base, a ControlNet's base
            frozen = {"base": base_params(config, mesh), "text_encoder": text}
            params, stage = sampling_view(parts, stage, frozen, params)
        sample_fn = make_sample_fn(
            parts.model.apply, parts.schedule, **experiment.sampler_kwargs(config)
        )
        return cls(
            config=config,
            params=params,
            sample_fn=sample_fn,
            mesh=mesh,
            step=step,
            decoder=latent_decoder(config, mesh),
            stage=stage,
            apply_fn=parts.model.apply,
            schedule=parts.schedule,
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

            schedule = None
        else:
            schedule = experiment.build_schedule(config)
            sample_fn = make_sample_fn(model.apply, schedule, **experiment.sampler_kwargs(config))
        mesh = (
            parallel.make_mesh(1, 1, devices=jax.local_devices()[:1])
            if serialized
            else (parallel.make_mesh(config.mesh.data, config.mesh.fsdp))
        )
        return cls(
            config=config,
            params=params,
            sample_fn=sample_fn,
            mesh=mesh,
            step=meta["step"],
            decoder=latent_decoder(config, mesh, recorded=meta.get("latent")),
            stage=text_stage(config, mesh),
            apply_fn=None if serialized else model.apply,
            schedule=schedule,
        )

    def batches(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        batch_size: int = 256,
        progress: bool = False,
        noise: np.ndarray | None = None,
        prompts: Sequence[str] | None = None,
        control: np.ndarray | None = None,
        edit: Edit | None = None,
        first_batch: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (uint8 images [n, H, W, C], labels int32 [n]) batch by batch, in order.

        Memory is bounded by one batch whatever `num_samples` is. Labels cycle 0..K-1
        for class-conditional models unless `labels` is given (then it is cycled to
        length N). The noise of image i depends only on `seed` and i's batch, so results
        do not depend on the device count. `noise` (float [N, H, W, C], standard normal)
        replaces the draw from `seed`, e.g. to reproduce a run of another framework.
        `prompts` (text-conditioned runs) are cycled to length N instead of class
        captions; the labels yielded are then the prompt indices. `labels="none"` samples
        a class-conditional model unconditionally (the null class).

        A ControlNet run samples with `control` (float [M, H, W, C] in [0, 1] or uint8,
        at the output image size), image i with control i % M; without it, with the
        control images of the run's first training records (`data_controls`).

        `edit` (`sample_fn.Edit`) edits given images instead (image i edits
        `edit.images[i % M]`): img2img from `edit.strength`, and with `edit.masks`
        inpainting (blend or RePaint) whose kept pixels come back exactly. A latent model
        edits the images' VAE latents (posterior mean) under the mask downsampled to the
        latent grid (a latent is regenerated when any of its pixels is), and the kept
        pixels are pasted back after decoding.

        `first_batch` starts at that batch (of `batch_size`, rounded to the device count),
        yielding what an uninterrupted run yields from there (a resumed dataset).
        """
        conditions = self._conditioner(num_samples, labels, prompts, control)
        sample_fn = self.sample_fn if edit is None else self._edit_fn(edit)
        sharding = parallel.batch_sharding(self.mesh)
        shape = experiment.image_shape(self.config)
        for start, n, z, key in noise_batches(
            num_samples,
            batch_size,
            self.mesh,
            shape,
            seed=seed,
            noise=noise,
            progress=progress,
            first_batch=first_batch,
        ):
            idx = np.arange(start, start + z.shape[0])
            cond, lab = conditions(idx, edit)
            z, cond = jax.device_put((z, cond), sharding)
            extra, pixels = (), None  # (null_cond[, edit arrays]) where needed
            if self.stage is not None:
                cond = self.stage.conditions(cond)
                extra = (self.stage.null_condition(z.shape[0]),)
            if edit is not None:
                arrays, pixels = self._edit_arrays(edit, idx)
                extra = (extra[0] if extra else None, jax.device_put(arrays, sharding))
            x = sample_fn(self.params, z, cond, key, *extra)
            if self.decoder is not None:
                x = self.decoder(x)
                if pixels is not None and pixels[1] is not None:  # the kept pixels, exactly
                    x = jnp.where(jnp.asarray(pixels[1]) >= 0.5, x, jnp.asarray(pixels[0]))
            yield images.to_uint8(parallel.gather(x))[:n], lab[:n]

    def invert(
        self,
        images_u8: np.ndarray,
        *,
        labels: Sequence[int] | str | None = None,
        prompts: Sequence[str] | None = None,
        control: np.ndarray | None = None,
        method: str | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> np.ndarray:
        """Images -> the noise from which `batches(noise=...)` regenerates them.

        DDIM (default) or DPM-Solver++(2M) inversion (`diffusion.editing.invert`) with this
        generator's steps, guidance and condition (image i with label/prompt i, cycled,
        as in `batches`). A latent model inverts the images' VAE latents (posterior
        mean). Sample back with the same method, steps and guidance.

        Args:
          images_u8: uint8 [N, H, W, C] at the output size.
          labels, prompts, control: the condition, as for `batches`.
          method: `ddim` (default) or `dpmpp_2m`.
          batch_size: images per device call.
          progress: show a progress bar.

        Returns:
          float32 [N, h, w, c]: the noise (the latent shape for latent models).
        """
        self._require_editing("inversion")
        imgs = np.asarray(images_u8)
        Edit(imgs).check(self.image_shape, "this model", flag="--images")
        n_total = len(imgs)
        method = method or "ddim"
        key = ("invert", method)
        if key not in self._edit_fns:
            kwargs = {**experiment.sampler_kwargs(self.config), "method": method}
            self._edit_fns[key] = make_invert_fn(self.apply_fn, self.schedule, **kwargs)
        invert_fn = self._edit_fns[key]
        conditions = self._conditioner(n_total, labels, prompts, control)
        sharding = parallel.batch_sharding(self.mesh)
        out = []
        for _, idx in index_batches(
            n_total, batch_size, self.mesh, progress=progress, desc="invert"
        ):
            # An inpainting model inverts as a whole-image generator (mask of ones).
            cond, _ = conditions(idx)
            x = self._model_space(images.uint8_to_float(imgs[idx % n_total]))
            x, cond = jax.device_put((x, cond), sharding)
            if self.stage is None:
                z = invert_fn(self.params, x, cond)
            else:
                null = self.stage.null_condition(len(idx))
                z = invert_fn(self.params, x, self.stage.conditions(cond), null)
            out.append(np.asarray(parallel.gather(z), np.float32)[: n_total - idx[0]])
        return np.concatenate(out)

    def _require_editing(self, what: str) -> None:
        if self.apply_fn is None:
            raise ValueError(
                f"{what} runs diffjax's sampler code; the serialized (jax.export) sampler only "
                "samples. Drop --serialized."
            )

    def _edit_fn(self, edit: Edit):
        """The compiled sampler of an editing run (one per set of static options)."""
        self._require_editing("Editing (--init_images)")
        edit.check(self.image_shape, "this model")
        options = edit.sampler_kwargs()
        key = ("edit", tuple(sorted(options.items())))
        if key not in self._edit_fns:
            kwargs = {**experiment.sampler_kwargs(self.config), **options}
            self._edit_fns[key] = make_sample_fn(self.apply_fn, self.schedule, **kwargs)
        return self._edit_fns[key]

    def _model_space(self, pixels: np.ndarray) -> jax.Array:
        """Images in [-1, 1] -> what the model samples: themselves, or their latents."""
        x = jnp.asarray(pixels, jnp.float32)
        return x if self.decoder is None else self.decoder.encode(x)

    def _inpaint_concat(self, edit: Edit | None, idx: np.ndarray) -> jax.Array | None:
        """An inpainting model's mask and masked image for samples `idx` (None for other
        models, and for a pixel model generating whole images: `sampling_condition`
        fills in the full mask). Without masks the whole image is regenerated."""
        if not experiment.is_inpainting(self.config):
            return None
        if edit is None or edit.masks is None:
            return full_mask_concat(self.config, self.decoder, len(idx))
        img, mask = edit.pixels(idx)
        if self.decoder is None:
            return experiment.inpaint_concat(self.config, img, mask)
        return experiment.inpaint_concat(
            self.config, img, mask, encode=self.decoder.encode, factor=self.decoder.factor
        )

    def _edit_arrays(self, edit: Edit, idx: np.ndarray) -> tuple[dict, tuple]:
        """`sample_fn`'s edit arrays for samples `idx`, and their (pixels, pixel masks)."""
        img, mask = edit.pixels(idx)
        known = self._model_space(img)
        arrays = {}
        if edit.strength < 1.0:
            arrays["init_image"] = known
        if mask is not None:
            if self.decoder is not None:
                m = editing.downsample_mask(mask, self.decoder.factor, mode="any")
            else:
                m = jnp.asarray(mask)
            arrays.update(inpaint_known=known, inpaint_mask=m)
        return arrays, (img, mask)

    def _conditioner(self, num_samples: int, labels, prompts, control):
        """`conditions(idx) -> (model conditioning, labels)` for samples `idx` (cycled)."""
        controls = self._controls(control, num_samples)
        if prompts:
            table = prompt_condition(self.config, list(prompts))
            label_at = lambda idx: (idx % len(prompts)).astype(np.int32)  # noqa: E731
        else:
            label_at = self._label_rule(labels)

        def conditions(idx: np.ndarray, edit: Edit | None = None) -> tuple[dict, np.ndarray]:
            lab = label_at(idx)
            ctrl = None if controls is None else controls[idx % len(controls)]
            concat = self._inpaint_concat(edit, idx)
            if prompts:
                cond = {k: v[lab] for k, v in table.items()}
                if ctrl is not None:
                    cond.update(experiment.control_condition(self.config, ctrl))
                if experiment.is_inpainting(self.config):
                    cond["concat"] = experiment.concat_condition(self.config, len(idx), concat)
            else:
                cond = experiment.sampling_condition(self.config, lab, ctrl, concat)
            return cond, lab

        return conditions

    def generate(self, num_samples: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """All of `batches(num_samples, **kwargs)` in memory: (uint8 [N, H, W, C], int32 [N])."""
        parts = list(self.batches(num_samples, **kwargs))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _controls(self, control: np.ndarray | None, num_samples: int) -> np.ndarray | None:
        """A ControlNet run's control images as float [M, H, W, C] in [0, 1]."""
        if not experiment.is_controlnet(self.config):
            if control is not None:
                raise ValueError(
                    "--control_image/--control_source apply to ControlNet runs "
                    "(controlnet.control); this run has no ControlNet."
                )
            return None
        if control is None:
            return data_controls(self.config, self.image_shape, min(num_samples, 4096))[0]
        control = np.asarray(control)
        return images.uint8_to_unit(control) if control.dtype == np.uint8 else control

    def _label_rule(self, labels: Sequence[int] | str | None):
        """`label_at(indices) -> int32 labels` (computed per batch, never all at once)."""
        k = self.num_classes
        if isinstance(labels, str):
            if labels != "none":
                raise ValueError(f"labels must be ints or 'none', got {labels!r}.")
            if not k:
                raise ValueError(
                    "labels='none' samples a class-conditional model without its "
                    "class; this model has no classes."
                )
            return lambda idx: np.full(len(idx), k, np.int32)  # the null class
        if labels is not None and len(labels):
            given = np.asarray(labels, np.int32)
            if k and (given.min() < 0 or given.max() >= k):
                raise ValueError(
                    f"labels must lie in [0, {k - 1}], got {sorted(set(given.tolist()))}."
                )
            return lambda idx: given[idx % len(given)]
        # The sampling contract (`cycle_labels`): 0..K-1 repeated; all 0 when unconditional.
        return lambda idx: (idx % max(k, 1)).astype(np.int32)


def data_controls(
    config: ml_collections.ConfigDict, image_shape: Sequence[int], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The control images (float [n, H, W, C] in [0, 1]) and labels of a ControlNet run's
    first `n` training records, in order (what sample grids and evaluation use when no
    control is given). `image_shape` is the output images' [H, W, C]."""
    from diffjax import data as data_lib
    from diffjax.pretrained import stage as stage_lib

    fields = stage_lib.data_fields(config, None)
    fields["image_size"], _, fields["channels"] = image_shape
    source = data_lib.make_source(**fields)
    records = [source[i % len(source)] for i in range(n)]
    labels = np.asarray([r.get("labels", 0) for r in records], np.int32)
    return np.stack([r["control"] for r in records]).astype(np.float32), labels


def full_mask_concat(config: ml_collections.ConfigDict, decoder: Any, n: int) -> Any:
    """An inpainting model's mask and masked image for plain generation (everything
    regenerated: the `full` training masks): None for a pixel model (`sampling_condition`
    fills it in), the mask of ones and the VAE latents of a zero image for a latent one."""
    if decoder is None:
        return None
    h, w, c = decoder.image_shape(experiment.image_shape(config))
    zeros, ones = np.zeros((n, h, w, c), np.float32), np.ones((n, h, w, 1), np.float32)
    return experiment.inpaint_concat(
        config, zeros, ones, encode=decoder.encode, factor=decoder.factor
    )


def latent_decoder(config: ml_collections.ConfigDict, mesh, recorded: dict | None = None):
    """The `LatentDecoder` of a latent model's `latent.vae` (None for pixel models).

    `recorded` (an export's `latent` entry) must match the VAE found at that path.
    """
    if not config.latent.vae:
        return None
    from diffjax.pretrained import pipeline, safetensors_io

    decoder = pipeline.LatentDecoder.from_path(config.latent.vae, mesh)
    if recorded and recorded.get("vae_sha256"):
        digest = safetensors_io.weights_sha256(decoder.path)
        if digest != recorded["vae_sha256"]:
            raise export.ExportError(
                f"the VAE at {decoder.path} (SHA-256 {digest[:12]}...) is not the one this "
                f"model was trained with ({recorded['vae_sha256'][:12]}...); point "
                "--config.latent.vae or the export's config at the original VAE."
            )
    return decoder


def base_params(config: ml_collections.ConfigDict, mesh) -> Any:
    """The base weights a run adapts or starts from: `base_workdir`'s EMA params, or a
    LoRA's or ControlNet's pipeline U-Net (`pretrained`); None when the run has no such
    base (a full fine-tune of a pipeline reads its U-Net when it starts)."""
    if config.base_workdir:
        return rundir.base_params(config, mesh)
    if config.pretrained and (experiment.lora_rank(config) or experiment.is_controlnet(config)):
        from diffjax.pretrained import stage

        model = experiment.build_model(config)
        shapes = nn.meta.unbox(
            jax.eval_shape(experiment.make_init_fn(model, config), jax.random.key(0))
        )
        return stage.initial_params(config, shapes)
    return None


def sampling_view(parts: rundir.Components, stage: Any, frozen: Any, params: Any):
    """(denoiser params, frozen stage) that a state's (EMA) params sample with: for a
    LoRA run the LoRA merged into `frozen["base"]`, and a text-encoder LoRA into the
    stage's text encoder; the params and stage as they are otherwise."""
    model_params = parts.model_params(params, frozen)
    if stage is not None and "text_encoder" in (parts.lora_targets or {}):
        stage = stage.with_params(text_encoder=parts.text_params(params, frozen))
    return model_params, stage


def class_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """DreamBooth's prior prompts: `dreambooth.class_prompt`, or (empty) every class
    caption of the base run's data ("a handwritten zero" ... for digits_text)."""
    if config.dreambooth.class_prompt:
        return [config.dreambooth.class_prompt]
    if config.base_workdir:
        from diffjax.data.captions import class_caption_list

        base = rundir.load_workdir_config(config.base_workdir)
        if experiment.conditioning_kind(base) == "text":
            return class_caption_list(base.data)
    raise ValueError(
        "dreambooth.class_prompt is empty and the base has no class captions to use; set "
        "the prior's prompt, e.g. --config.dreambooth.class_prompt='a photo of a dog'."
    )


def class_images(config: ml_collections.ConfigDict, *, write: bool = True) -> str:
    """Generates DreamBooth's class images once with the base model (diffjax's sampler,
    `sample.*` settings), into `dreambooth.class_dir`; reused while their record
    (`meta.json`: base, prompts, count, sampler, seed) matches the config.

    Returns the images file. Every process samples (the params are global arrays);
    only `write` saves.

    Raises:
      ValueError: the cached images were made otherwise (names the difference).
    """
    from diffjax.data.dreambooth import CLASS_FILE

    db, s = config.dreambooth, config.sample
    directory = os.path.abspath(db.class_dir)
    path, meta_path = os.path.join(directory, CLASS_FILE), os.path.join(directory, "meta.json")
    prompts = class_prompts(config)
    meta = {
        "base": os.path.abspath(config.pretrained or config.base_workdir),
        "prompts": prompts,
        "num_class_images": int(db.num_class_images),
        "method": s.method,
        "num_steps": int(s.num_steps),
        "guidance": float(s.guidance),
        "seed": int(config.seed),
    }
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)
        if saved == meta:
            return path
        diff = sorted(k for k in meta if saved.get(k) != meta[k])
        raise ValueError(
            f"The class images in {directory} were made with other {diff} than this config "
            f"asks for; delete {directory} to regenerate them, or set dreambooth.class_dir."
        )
    if config.pretrained:
        from diffjax.pretrained import pipeline

        gen = pipeline.PretrainedGenerator(
            pipeline.load_pipeline(config.pretrained, method=s.method),
            num_steps=s.num_steps,
            guidance=s.guidance,
        )
    else:
        gen = Generator.from_workdir(
            config.base_workdir, method=s.method, num_steps=s.num_steps, guidance=s.guidance
        )
    n = db.num_class_images
    imgs, _ = gen.generate(n, prompts=prompts, seed=config.seed, batch_size=64, progress=True)
    if write:  # both generators cycle the prompts: image i was asked for prompt i % P
        os.makedirs(directory, exist_ok=True)
        tmp = path[: -len(".npz")] + ".tmp.npz"
        captions = np.asarray([prompts[i % len(prompts)] for i in range(n)])
        np.savez(tmp, images=imgs, captions=captions)
        os.replace(tmp, path)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    return path


def text_stage(config: ml_collections.ConfigDict, mesh):
    """The frozen text encoder of a run with `text.encoder` (None otherwise): sampling
    needs it to turn caption ids into the model's context (images are not encoded)."""
    if not config.get("text", {}).get("encoder", ""):
        return None
    from diffjax.pretrained import stage

    text_only = ml_collections.ConfigDict(config.to_dict())
    text_only.latent.vae = ""  # decoding is the LatentDecoder's; nothing to encode here
    return stage.build_stage(text_only, mesh)


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


def write_samples(
    path: str,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    num_samples: int,
    image_shape: tuple[int, int, int],
    ncols: int | None = None,
) -> tuple[str, str]:
    """Streams (images, labels) batches into `path` (.npz) and writes a PNG grid beside it.

    The .npz holds `images` uint8 [N, H, W, C] and `labels` int32 [N] (what `np.load`
    reads); it is written batch by batch into an uncompressed zip, so memory stays
    bounded by one batch, and refused at once when it would not fit on the disk. The
    file appears (atomically) only when complete; the grid shows the first 400 images.
    """
    if not path.endswith(".npz"):
        raise ValueError(f"The samples file must end in .npz, got {path!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    need = num_samples * (int(np.prod(image_shape)) + 4) + (1 << 20)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise ValueError(
            f"{num_samples} samples of shape {tuple(image_shape)} need {need / 2**30:.1f} GiB "
            f"in {directory}, which has {free / 2**30:.1f} GiB free; sample fewer or write "
            "elsewhere."
        )
    tmp = path[: -len(".npz")] + ".tmp.npz"
    try:
        head = []
        with (
            tempfile.TemporaryFile(dir=directory) as labels,
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            with zf.open("images.npy", "w", force_zip64=True) as f:
                header = {
                    "descr": "|u1",
                    "fortran_order": False,
                    "shape": (num_samples, *image_shape),
                }
                np.lib.format.write_array_header_2_0(f, header)
                written = 0
                for imgs, labs in batches:
                    f.write(np.ascontiguousarray(imgs, np.uint8).tobytes())
                    labels.write(np.asarray(labs, "<i4").tobytes())
                    if written < 400:  # the grid shows the first 400 images
                        head.append(imgs[: 400 - written])
                    written += len(imgs)
            if written != num_samples:
                raise RuntimeError(f"wrote {written} samples, expected {num_samples}")
            with zf.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": "<i4", "fortran_order": False, "shape": (num_samples,)}
                )
                labels.seek(0)
                shutil.copyfileobj(labels, f)
    except BaseException:
        # An interrupted or failed write leaves no partial file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    png = path[: -len(".npz")] + ".png"
    images.save_grid(np.concatenate(head), png, ncols=ncols)
    return path, png
