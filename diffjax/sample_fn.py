"""`make_sample_fn`: a Flax model, its conditioning, guidance and a sampler as one jitted fn.

The samplers themselves (pure math on a `model_fn(x, t)`) live in
`diffjax.diffusion.samplers`; drawing batches of images from a run or an export is
`diffjax.generate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import images as images_lib
from diffjax import parallel
from diffjax.diffusion import editing, samplers
from diffjax.diffusion import guidance as guidance_lib


def null_condition(
    cond: dict[str, jax.Array], num_classes: int, *, guess_mode: bool = False
) -> dict[str, jax.Array]:
    """The unconditional counterpart of `cond` (model keyword arguments): the null class,
    an all-False caption mask; a ControlNet's control stays (diffusers), except in guess
    mode, where the unconditional branch runs without it (`control_scale` 0)."""
    null = dict(cond)
    if guess_mode and "control_scale" in null:
        null["control_scale"] = jnp.zeros_like(null["control_scale"])
    if "labels" in null:
        null["labels"] = jnp.full_like(null["labels"], num_classes)
    if "context_mask" in null:
        null["context_mask"] = jnp.zeros_like(null["context_mask"])
    return null


def make_sample_fn(
    apply_fn: Callable,
    schedule: Any,
    *,
    method: str,
    num_steps: int,
    prediction: str = "epsilon",
    guidance: float = 1.0,
    guidance_rescale: float = 0.0,
    num_classes: int = 0,
    control_window: tuple[float, float] | None = None,
    guess_mode: bool = False,
    jit: bool = True,
    **sampler_kwargs: Any,
) -> Callable[..., jax.Array]:
    """Builds `sample_fn(params, noise, cond, key, null_cond=None, edit=None) -> images`,
    jitted once per shape.

    Args:
      apply_fn: the Flax module's `apply`.
      schedule: a `diffjax.diffusion.schedules` schedule.
      method, num_steps, prediction: the sampler (see `diffjax.diffusion.samplers`).
      guidance: classifier-free guidance scale; a Python 1.0 uses the conditional model
        alone (one network call per evaluation), an array is always applied.
      guidance_rescale: guidance rescale factor.
      num_classes: value of the null label.
      control_window: `(t_lo, t_hi)` in the schedule's time (`samplers.step_window`):
        a ControlNet's `control_scale` (in `cond`) applies only to evaluations at
        `t_lo <= t <= t_hi`, zero elsewhere (diffusers' control_guidance_start/end).
      guess_mode: a ControlNet's guess mode: the derived null condition has
        `control_scale` 0 (a given `null_cond` that carries `control_scale` keeps its own).
      jit: return the function jitted (False for embedding in a larger traced fn).
      **sampler_kwargs: passed to `samplers.sample` (eta, clip_x0, and an editing run's
        static options: strength, inpaint_noise, jump_length, jump_n_sample; see `Edit`).

    `cond` holds the model's conditioning keywords (`labels`, or `context` and
    `context_mask`), batched like `noise`; `{}` for unconditional models. `null_cond`
    is guidance's unconditional branch; None derives it from `cond` (the null class, an
    all-False caption mask), a pretrained text model passes the encoding of its negative
    prompt (keys it lacks, e.g. a ControlNet's `control`, are derived from `cond`). `edit`
    holds an editing run's arrays (`init_image`, `inpaint_known`, `inpaint_mask`: see
    `samplers.sample`), batched like `noise`. Images come back in model space ([-1, 1]
    for pixels), float32.
    """

    guided = functools.partial(
        guided_model_fn,
        apply_fn,
        schedule,
        prediction=prediction,
        guidance=guidance,
        guidance_rescale=guidance_rescale,
        num_classes=num_classes,
        control_window=control_window,
        guess_mode=guess_mode,
    )

    def sample_fn(params, noise, cond, key, null_cond=None, edit=None):
        model_fn = guided(params, noise.shape[-1], cond, null_cond)
        return samplers.sample(
            model_fn,
            noise,
            schedule=schedule,
            method=method,
            num_steps=num_steps,
            prediction=prediction,
            key=key,
            **sampler_kwargs,
            **(edit or {}),
        )

    return (
        jax.jit(sample_fn, compiler_options=parallel.compiler_options(program="sample"))
        if jit
        else sample_fn
    )


def guided_model_fn(
    apply_fn: Callable,
    schedule: Any,
    params: Any,
    channels: int,
    cond: dict[str, jax.Array],
    null_cond: dict[str, jax.Array] | None,
    *,
    prediction: str,
    guidance: float,
    guidance_rescale: float = 0.0,
    num_classes: int = 0,
    control_window: tuple[float, float] | None = None,
    guess_mode: bool = False,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The samplers' `model_fn(x, t)`: the Flax model on `params` with `cond`, its
    schedule's preconditioning and classifier-free guidance (`make_sample_fn`'s
    arguments). `channels` is the state's channel count: a learned-variance model's
    extra outputs are dropped. `cond["concat"]` (an inpainting model's mask and masked
    image, [B, H, W, C']) is concatenated to the state on the channel axis, in both
    branches of guidance (diffusers' inpainting pipelines do the same)."""

    def net_fn(x, t, c):
        if "concat" in c:
            c = dict(c)
            x = jnp.concatenate([x, c.pop("concat").astype(x.dtype)], axis=-1)
        out = apply_fn({"params": params}, x, t, **c)
        return out[..., :channels].astype(jnp.float32)

    cond_model_fn = schedule.precondition(net_fn)
    if control_window is not None:
        cond_model_fn = _windowed(cond_model_fn, control_window)
    if cond and not (isinstance(guidance, (int, float)) and guidance == 1.0):
        null = null_condition(cond, num_classes, guess_mode=guess_mode)
        if null_cond is not None:
            # A given null (a text stage's encoded "") wins; keys it lacks (a
            # ControlNet's control and scale, an inpainting model's concat) come from `cond`.
            null = {**null, **null_cond}
        return guidance_lib.classifier_free(
            cond_model_fn,
            cond,
            null,
            guidance,
            rescale=guidance_rescale,
            schedule=schedule,
            prediction=prediction,
        )
    return lambda x, t: cond_model_fn(x, t, cond)


# Options of `samplers.sample` that `editing.invert` takes too (the rest are refused there).
INVERT_OPTIONS = ("placement", "rho", "clip_x0", "dynamic_threshold", "t_final")
# `make_sample_fn`'s options that `guided_model_fn` takes.
GUIDANCE_OPTIONS = ("guidance", "guidance_rescale", "num_classes", "control_window", "guess_mode")


def make_invert_fn(
    apply_fn: Callable,
    schedule: Any,
    *,
    method: str,
    num_steps: int,
    prediction: str = "epsilon",
    jit: bool = True,
    **kwargs: Any,
) -> Callable[..., jax.Array]:
    """Builds `invert_fn(params, images, cond, null_cond=None) -> noise`, the inverse of
    `make_sample_fn`'s `sample_fn` with the same arguments (`editing.invert`: DDIM or
    DPM-Solver++(2M) inversion with the condition and guidance used). `images` are in
    model space (latents for latent models); the noise is what `sample_fn` starts from.
    `kwargs` are `make_sample_fn`'s: the guidance options (`GUIDANCE_OPTIONS`) and the
    sampler options inversion takes (`INVERT_OPTIONS`); the others (eta, churn) are
    dropped: inversion is deterministic."""
    options = {k: v for k, v in kwargs.items() if k in INVERT_OPTIONS}
    guided = functools.partial(
        guided_model_fn,
        apply_fn,
        schedule,
        prediction=prediction,
        **{k: v for k, v in kwargs.items() if k in GUIDANCE_OPTIONS},
    )

    def invert_fn(params, images, cond, null_cond=None):
        model_fn = guided(params, images.shape[-1], cond, null_cond)
        return editing.invert(
            model_fn,
            images,
            schedule=schedule,
            method=method,
            num_steps=num_steps,
            prediction=prediction,
            **options,
        )

    return (
        jax.jit(invert_fn, compiler_options=parallel.compiler_options(program="sample"))
        if jit
        else invert_fn
    )


def _windowed(cond_model_fn: Callable, window: tuple[float, float]) -> Callable:
    """`cond_model_fn` with `cond["control_scale"]` zeroed outside `window` (by t)."""
    lo, hi = window

    def fn(x, t, c):
        if "control_scale" in c:
            keep = ((t >= lo) & (t <= hi)).astype(jnp.float32)
            c = {**c, "control_scale": c["control_scale"] * keep[:, None]}
        return cond_model_fn(x, t, c)

    return fn


def cycle_labels(n: int, num_classes: int) -> jnp.ndarray:
    """Labels 0..K-1 repeated to length n (the sampling contract of launch/sample.py)."""
    return jnp.arange(n, dtype=jnp.int32) % max(num_classes, 1)


def check_noise(
    noise: np.ndarray | None, num_samples: int, shape: tuple[int, ...]
) -> np.ndarray | None:
    """Validates user-given initial noise: float [num_samples, *shape] (NHWC)."""
    if noise is None:
        return None
    noise = np.asarray(noise)
    want = (num_samples, *shape)
    if noise.shape != want:
        raise ValueError(
            f"--noise must hold float32 [N, h, w, c] = {list(want)} (NHWC; latent shape for "
            f"latent models, before any init_noise_sigma scaling), got {list(noise.shape)}."
        )
    if not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"--noise must be floating point, got {noise.dtype}.")
    return noise.astype(np.float32)


def noise_batches(
    num_samples: int,
    batch_size: int,
    mesh: Any,
    shape: tuple[int, ...],
    *,
    seed: int = 0,
    noise: np.ndarray | None = None,
    progress: bool = False,
    first_batch: int = 0,
):
    """The batches of a sampling run: yields `(start, n, noise, key)` in order.

    Every batch has the same shape (one compilation; the tail is padded and its extra
    images are dropped by the caller, `n` being the real count); `batch_size` is rounded
    to a multiple of the mesh's device count. `noise` [batch, *shape] is drawn from
    `seed` and the batch index, so image i does not depend on the device count; a given
    `noise` [num_samples, *shape] (checked) replaces the draw. `key` is the sampler's.
    `first_batch` skips the batches before it (a resumed run: batch b is the same
    whichever batch the run starts at).
    """
    given = check_noise(noise, num_samples, shape)
    key = jax.random.key(seed)
    for b, idx in index_batches(
        num_samples, batch_size, mesh, progress=progress, desc="sample", first_batch=first_batch
    ):
        start, n = int(idx[0]), min(len(idx), num_samples - int(idx[0]))
        k_noise, k_sample = jax.random.split(jax.random.fold_in(key, b))
        z = jax.random.normal(k_noise, (len(idx), *shape), jnp.float32)
        if given is not None:
            z = jnp.concatenate([jnp.asarray(given[start : start + n]), z[n:]])
        yield start, n, z, k_sample


def index_batches(
    num_items: int,
    batch_size: int,
    mesh: Any,
    *,
    progress: bool = False,
    desc: str = "sample",
    first_batch: int = 0,
):
    """Fixed-size batches of item indices: yields `(b, idx)`, `idx` int [batch] running
    on from batch `b`'s first item (the tail's run past `num_items`: the caller cycles or
    pads them and drops their results), from `first_batch` on. `batch_size` is rounded
    down to a multiple of the mesh's device count (at least one per device): one
    compiled shape for the whole run."""
    if num_items <= 0:
        raise ValueError(f"the number of images must be positive, got {num_items}.")
    ndev = mesh.devices.size
    batch_size = max(ndev, batch_size - batch_size % ndev)
    batches = list(enumerate(range(0, num_items, batch_size)))[first_batch:]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
    for b, start in batches:
        yield b, np.arange(start, start + batch_size)


INPAINT_MODES = ("blend", "repaint")


@dataclasses.dataclass(frozen=True)
class Edit:
    """An editing run's inputs (`launch/sample.py --init_images --mask --strength ...`).

    Attributes:
      images: uint8 [M, H, W, C] at the output size (what sample.py writes); sample i
        edits image `i % M`.
      masks: uint8 [M', H, W] (Stable Diffusion's convention: 255 = regenerate, 0 = keep;
        values >= 128 regenerate), sample i with mask `i % M'`; None: no inpainting.
      strength: img2img / SDEdit strength in (0, 1]: the last `round(strength * steps)`
        steps from the image noised to their start (1: from pure noise).
      inpaint: `blend` (the known region replaced at every step) or `repaint` (blend
        with RePaint's resampling, `jump_length`, `jump_n_sample`).
      jump_length, jump_n_sample: RePaint's resampling (Lugmayr et al. use 10 and 10).
    """

    images: np.ndarray
    masks: np.ndarray | None = None
    strength: float = 1.0
    inpaint: str = "blend"
    jump_length: int = 10
    jump_n_sample: int = 10

    def check(
        self, image_shape: Sequence[int], what: str = "the model", flag: str = "--init_images"
    ) -> None:
        """Refuses inputs that do not fit images of `image_shape` [H, W, C], naming the fix
        (`flag`: how the user gave the images, e.g. invert.py's `--images`)."""
        h, w, c = (int(v) for v in image_shape)
        imgs = np.asarray(self.images)
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[1:] != (h, w, c):
            raise ValueError(
                f"{flag} must hold uint8 images [N, {h}, {w}, {c}] ({what}'s output "
                f"size and channels), got {imgs.dtype} {list(imgs.shape)}."
            )
        if not len(imgs):
            raise ValueError(f"{flag} holds no image.")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"--strength must lie in (0, 1], got {self.strength}.")
        if self.inpaint not in INPAINT_MODES:
            raise ValueError(f"--inpaint must be one of {INPAINT_MODES}, got {self.inpaint!r}.")
        if self.masks is None:
            if self.inpaint == "repaint":
                raise ValueError("--inpaint=repaint needs --mask.")
            return
        masks = np.asarray(self.masks)
        if masks.ndim == 4 and masks.shape[-1] == 1:
            masks = masks[..., 0]
        if masks.dtype != np.uint8 or masks.ndim != 3 or masks.shape[1:] != (h, w):
            raise ValueError(
                f"--mask must hold uint8 masks [N, {h}, {w}] (255 = regenerate, 0 = keep), got "
                f"{masks.dtype} {list(np.shape(self.masks))}."
            )
        if not len(masks):
            raise ValueError("--mask holds no mask.")
        if self.inpaint == "repaint":
            for name in ("jump_length", "jump_n_sample"):
                if int(getattr(self, name)) < 1:
                    raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")

    def sampler_kwargs(self) -> dict[str, Any]:
        """The static options of `make_sample_fn` for this edit (beside the arrays)."""
        kwargs: dict[str, Any] = {"strength": float(self.strength)}
        if self.masks is not None and self.inpaint == "repaint":
            kwargs.update(jump_length=int(self.jump_length), jump_n_sample=int(self.jump_n_sample))
        return kwargs

    def pixels(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Samples `idx`'s images (float32 [n, H, W, C] in [-1, 1]) and masks (float32
        [n, H, W, 1], 1 = regenerate; None without masks), cycled."""
        img = images_lib.uint8_to_float(np.asarray(self.images)[idx % len(self.images)])
        if self.masks is None:
            return img, None
        masks = np.asarray(self.masks)
        masks = masks[..., 0] if masks.ndim == 4 else masks
        return img, (masks[idx % len(masks)] >= 128).astype(np.float32)[..., None]
