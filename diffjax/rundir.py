"""The run directory: what a training run leaves on disk and how it is read back.

A run directory (`workdir`) holds `config.json`, `checkpoints/` (Orbax), `metrics.jsonl`,
`samples/`, `eval/` and TensorBoard events. Training (`diffjax.train.loop`), sampling
(`diffjax.generate`), export and evaluation all go through this room to prepare, read and
check it, so none of them imports another's module.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import socket
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from diffjax import experiment, models
from diffjax.checkpoint import Checkpointer, abstract_with_shardings
from diffjax.diffusion import editing
from diffjax.finetune import lora
from diffjax.models.controlnet import Controlled
from diffjax.train.autoencoder import make_autoencoder_loss_fn
from diffjax.train.state import TrainState, make_optimizer
from diffjax.train.step import init_train_state, make_loss_fn, make_train_step

log = logging.getLogger(__name__)


class WorkdirError(ValueError):
    """The workdir cannot be used: not a directory, not writable, or in use."""


class WorkdirMismatchError(WorkdirError):
    """The workdir holds checkpoints of a different model."""


class WorkdirLock:
    """One trainer per workdir: an advisory lock on `workdir/.lock` (pid and host inside).

    The operating system drops the lock when its holder dies, so a lock left by a killed
    run is taken over (with a message naming it); a live holder makes the second trainer
    fail at once, naming it. Only process 0 of a multi-process run takes it.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.path = os.path.join(workdir, ".lock")
        self._workdir, self._enabled, self._file = workdir, enabled, None

    def __enter__(self) -> WorkdirLock:
        if not self._enabled:
            return self
        _make_dir(self._workdir)
        f = open(self.path, "a+")  # noqa: SIM115 - held open (and locked) while training
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirError(
                f"{self._workdir} is in use by another trainer ({holder}). Wait for it to "
                "finish or stop it, or train into another --workdir."
            ) from None
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.warning(
                "Taking over the lock of %s left by a process that ended (%s).",
                self._workdir,
                previous,
            )
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.close()  # Closing releases the lock.
            self._file = None


def _make_dir(path: str) -> None:
    """Creates `path` (and parents), with errors that name the path and the fix."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"{path} is a file, not a directory. Pass a directory as --workdir.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"Cannot create {path}: {e.strerror}. Pass a writable --workdir."
        ) from None


def _check_writable(directory: str) -> None:
    """A probe write, so an unwritable checkpoint directory fails now, not at the first save."""
    _make_dir(directory)
    probe = os.path.join(directory, f".probe-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"{directory} is not writable ({e.strerror}); checkpoints could not be saved. "
            "Fix its permissions or pass another --workdir."
        ) from None


def has_checkpoints(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds step directories (a listing; opens nothing)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))


def saved_fingerprint(workdir: str) -> dict[str, Any] | None:
    """The model fingerprint in the newest readable checkpoint's metadata (None: none).

    The checkpoint, not config.json, identifies the model a run trained: a missing or
    edited config.json cannot make a run look like another model.
    """
    if not has_checkpoints(workdir):
        return None
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir)
    try:
        for step in reversed(ckpt.all_steps()):
            try:
                return ckpt.read_meta(step).get("model", {})
            except Exception as e:  # noqa: BLE001 - a corrupt step; an older one may do
                log.warning("Could not read the metadata of step %d in %s: %s", step, ckpt_dir, e)
        return None
    finally:
        ckpt.close()


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
    """Creates the workdir, refuses one made by another model, writes config.json.

    Raises:
      WorkdirError: the workdir is a file or not writable.
      WorkdirMismatchError: its checkpoints are of another model (nothing is changed).
    """
    _check_writable(os.path.join(workdir, "checkpoints"))
    path = os.path.join(workdir, "config.json")
    saved = saved_fingerprint(workdir)
    if saved is not None:
        check_same_model(saved, config, workdir)
    if is_main:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
        os.replace(tmp, path)


def check_same_model(
    saved: dict[str, Any], config: ml_collections.ConfigDict, workdir: str
) -> None:
    """Raises WorkdirMismatchError naming every differing field."""
    current = experiment.model_fingerprint(config)
    if saved.get("model") in models.MODELS:  # Fingerprints of older runs kept the defaults.
        saved = {
            **saved,
            "model_kwargs": experiment.model_kwargs_without_defaults(
                saved["model"], saved.get("model_kwargs", {})
            ),
        }
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        detail = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in diffs
        )
        raise WorkdirMismatchError(
            f"The workdir {workdir} holds checkpoints of a different model ({detail}). "
            "Nothing was changed there. Use a new --workdir, or the config that trained it."
        )


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (workdir/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a diffjax run directory "
            "(train into it with launch/train.py first)."
        )
    with open(path) as f:
        return experiment.upgrade_config(json.load(f))


@dataclasses.dataclass(frozen=True)
class Components:
    """What a config builds: model, diffusion, optimizer and the abstract sharded state."""

    model: Any
    schedule: Any  # None for task='autoencoder'
    loss: Any
    tx: Any
    lr_fn: Any
    init: Any  # init(key, unbox=...) -> TrainState
    abstract_state: Any
    state_sharding: Any
    train_step: Any  # train_step(state, batch, frozen=None) -> (state, metrics); pure, not jitted
    # A LoRA run (lora.rank > 0): the shardings of the frozen base params (frozen["base"]),
    # and the LoRA targets per component ({"denoiser": [...], "text_encoder": [...]}).
    base_sharding: Any = None
    lora_targets: Any = None
    lora_scale: float = 1.0  # alpha / rank
    model_shapes: Any = None  # the denoiser's params as shapes (a LoRA run's: the base's)
    # A ControlNet run (controlnet.control): `model` is `Controlled(base, (controlnet,))`,
    # the state's params are the ControlNet's, the base is frozen["base"].
    controlnet: bool = False

    def model_params(self, params: Any, frozen: Any) -> Any:
        """The params `model.apply` samples with, from a state's (EMA) params: merged
        with the frozen base for a LoRA run, beside it for a ControlNet run, the params
        themselves otherwise."""
        if self.controlnet:
            return {"base": frozen["base"], "controlnets_0": params}
        if self.lora_targets is None:
            return params
        return lora.merge(frozen["base"], params["denoiser"], self.lora_scale)

    def text_params(self, params: Any, frozen: Any) -> Any:
        """The text encoder's params: with the LoRA's text part merged when it has one."""
        text = frozen.get("text_encoder")
        if self.lora_targets is None or "text_encoder" not in params:
            return text
        return lora.merge(text, params["text_encoder"], self.lora_scale)


def build_components(
    config: ml_collections.ConfigDict,
    mesh,
    *,
    prepare: Any = None,
    null_context: Any = None,
    text_params: Any = None,
) -> Components:
    """Builds everything static about a run; allocates nothing (`jax.eval_shape`).

    `prepare(frozen, batch, key) -> batch` and `null_context` come from the run's frozen
    stage (`diffjax.pretrained.stage.FrozenStage`): images -> latents and token ids ->
    embeddings inside the step, with the null caption for condition dropout. Without
    them `train_step(state, batch)` trains on the batch as it is.

    A LoRA run (`lora.rank > 0`) trains `{"denoiser": lora, ["text_encoder": lora]}`
    (`diffjax.finetune.lora`); the step merges them into `frozen["base"]` (and the
    text encoder's `frozen["text_encoder"]`, whose params or shapes `text_params` gives).
    A ControlNet run trains the ControlNet's params; the step runs it beside the frozen
    `frozen["base"]` (`diffjax.models.controlnet.Controlled`).
    An inpainting run's (`inpainting.enabled`) batches carry a `mask`; the step builds
    `concat` = [mask, masked image] from it (pixel models here, latent models in the
    frozen stage's `prepare`, which encodes the masked image) and the loss calls the
    model on `concat([x_t, concat])` (`experiment.concat_apply`). Condition dropout
    leaves `concat` alone.
    """
    tc = config.train
    model = experiment.build_model(config)
    autoencoder = experiment.is_autoencoder(config)
    schedule = None if autoencoder else experiment.build_schedule(config)
    tx, lr_fn = make_optimizer(
        learning_rate=tc.learning_rate,
        lr_schedule=tc.lr_schedule,
        warmup_steps=tc.warmup_steps,
        num_steps=tc.num_steps,
        weight_decay=tc.weight_decay,
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        grad_clip=tc.grad_clip,
    )
    key = jax.random.key(config.seed)
    init_fn = experiment.make_init_fn(model, config)
    base_sharding = targets = None
    boxed_model = jax.eval_shape(init_fn, key)
    controlnet = experiment.is_controlnet(config)
    if experiment.lora_rank(config) or controlnet:
        base_sharding = models.param_shardings(boxed_model, mesh)
    if experiment.lora_rank(config):
        init_fn, targets = _lora_init(config, nn.meta.unbox(boxed_model), text_params)
    if controlnet:
        net = experiment.build_controlnet(config)
        init_fn = experiment.make_init_fn(net, config, control=True)
        model = Controlled(model, (net,), guess_mode=bool(config.controlnet.guess_mode))
    init = functools.partial(init_train_state, init_fn=init_fn, tx=tx)
    boxed = jax.eval_shape(functools.partial(init, unbox=False), key)
    if autoencoder:
        ae = config.autoencoder
        kw = dict(
            kl_weight=ae.kl_weight,
            recon_loss=ae.recon_loss,
            sample_posterior=ae.sample_posterior,
            perceptual_weight=ae.perceptual_weight,
            perceptual_weights=ae.perceptual_weights,
        )
        if experiment.has_discriminator(config):
            kw.update(
                disc_apply=experiment.build_discriminator(config).apply,
                gan_weight=ae.gan_weight,
                gan_start_step=ae.gan_start_step,
                gan_loss=ae.gan_loss,
                gan_adaptive_weight=ae.gan_adaptive_weight,
            )
        # recon, kl, psnr (+ perceptual, GAN terms) join the step's metrics from the
        # loss's own forward pass.
        loss = loss_fn = make_autoencoder_loss_fn(model.apply, **kw)
    else:
        loss = experiment.build_loss(config, schedule)
        apply_fn = model.apply
        if experiment.is_inpainting(config):
            apply_fn = experiment.concat_apply(model.apply)
            prepare = _inpaint_prepare(prepare, latent=bool(config.latent.vae))
        loss_fn = make_loss_fn(
            apply_fn,
            loss,
            precondition=schedule.precondition,
            cond_dropout=config.diffusion.cond_dropout,
            num_classes=config.data.num_classes,
            cond_keys=experiment.condition_keys(config),
            prepare=prepare,
            null_context=null_context,
        )
    if targets is not None:
        loss_fn = _lora_loss(loss_fn, experiment.lora_scale(config), config.lora.dropout)
    if controlnet:
        loss_fn = _controlnet_loss(loss_fn)
    train_step = make_train_step(
        loss_fn,
        tx,
        lr_fn,
        ema_decay=tc.ema_decay,
        ema_warmup=tc.ema_warmup,
        grad_accum_steps=tc.grad_accum_steps,
        has_aux=autoencoder,
    )
    return Components(
        model=model,
        schedule=schedule,
        loss=loss,
        train_step=train_step,
        tx=tx,
        lr_fn=lr_fn,
        init=init,
        abstract_state=jax.eval_shape(functools.partial(init, unbox=True), key),
        state_sharding=models.param_shardings(boxed, mesh),
        base_sharding=base_sharding,
        lora_targets=targets,
        lora_scale=experiment.lora_scale(config),
        model_shapes=nn.meta.unbox(boxed_model),
        controlnet=controlnet,
    )


def _inpaint_prepare(prepare, *, latent: bool):
    """The frozen front of an inpainting run's step: `prepare` (the stage's, or None) with
    the batch's `concat` built from its `image` and `mask` (pixel models: [mask, masked
    image], `editing.inpaint_condition`; latent models: by the stage, which encodes the
    masked image)."""

    def inpaint_prepare(frozen, batch, key):
        if not latent:
            batch = {**batch, "concat": editing.inpaint_condition(batch["image"], batch["mask"])}
        if prepare is not None:
            batch = prepare(frozen, batch, key)
        if "concat" not in batch:
            raise ValueError(
                "A latent inpainting model's masked-image latents come from its frozen stage "
                "(latent.vae encoding images in the step); build the train step with the "
                "stage's prepare."
            )
        return batch

    return inpaint_prepare


def _lora_init(config, base_shapes, text_params):
    """`init_fn(key) -> LoRA tree` and the targets of each component."""
    rank = experiment.lora_rank(config)
    targets = {
        "denoiser": lora.select_targets(base_shapes, experiment.lora_targets(config, "denoiser"))
    }
    if config.lora.text_encoder:
        if text_params is None:
            raise ValueError(
                "lora.text_encoder=True needs the text encoder's params (text.encoder)."
            )
        pattern = experiment.lora_targets(config, "text_encoder")
        targets["text_encoder"] = lora.select_targets(text_params, pattern)
        text_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), text_params)

    def init_fn(key):
        k_den, k_text = jax.random.split(key)
        out = {"denoiser": lora.init_lora(k_den, base_shapes, targets["denoiser"], rank)}
        if "text_encoder" in targets:
            out["text_encoder"] = lora.init_lora(k_text, text_shapes, targets["text_encoder"], rank)
        return out

    return init_fn, targets


def _lora_loss(loss_fn, scale: float, dropout: float = 0.0):
    """The loss of a LoRA run: the trained LoRA merged into the frozen base (and text
    encoder) inside the step, so gradients reach only A and B. With `dropout` > 0 the
    denoiser's LoRA runs beside its layers instead (`lora.runtime`: dropout on the
    LoRA's input, as peft's `lora_dropout`); sampling and exports merge either way."""

    def lora_loss(params, batch, rng, frozen, step):
        frozen = dict(frozen)
        base = frozen.pop("base")
        if "text_encoder" in params:
            frozen["text_encoder"] = lora.merge(
                frozen["text_encoder"], params["text_encoder"], scale
            )
        if dropout <= 0:
            return loss_fn(lora.merge(base, params["denoiser"], scale), batch, rng, frozen, step)
        key = jax.random.fold_in(rng, 0x10A)  # a stream of its own
        with nn.intercept_methods(lora.runtime(params["denoiser"], scale, dropout, key)):
            return loss_fn(base, batch, rng, frozen, step)

    return lora_loss


def _controlnet_loss(loss_fn):
    """The loss of a ControlNet run: the trained ControlNet beside the frozen base, so
    gradients reach only the ControlNet."""

    def controlnet_loss(params, batch, rng, frozen, step):
        frozen = dict(frozen)
        both = {"base": frozen.pop("base"), "controlnets_0": params}
        return loss_fn(both, batch, rng, frozen, step)

    return controlnet_loss


def apply_base_workdir(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the model of `config.base_workdir` (a diffjax run to fine-tune or
    adapt with a LoRA or a ControlNet): its `model.name`/`kwargs`, `diffusion` (but this
    run's own `cond_dropout`), the model-facing `data`
    fields (image size, channels, classes, text length, tokenizer), `latent`, `text` and
    `inpainting.enabled` (the masks stay this run's).
    Idempotent; unchanged when `base_workdir` is "".

    Raises:
      FileNotFoundError: the base run has no config.json or no checkpoint.
    """
    base_dir = config.get("base_workdir", "")
    if not base_dir:
        return config
    base_dir = os.path.abspath(os.path.expanduser(base_dir))
    if not has_checkpoints(base_dir):
        raise FileNotFoundError(
            f"base_workdir={base_dir} has no checkpoint; train the base first "
            f"(python launch/train.py --config=... --workdir={base_dir})."
        )
    base = load_workdir_config(base_dir)
    out = ml_collections.ConfigDict(config.to_dict())
    out.base_workdir = base_dir
    out.model.name = base.model.name
    out.model.kwargs = base.model.kwargs
    dropout = out.diffusion.cond_dropout  # a training choice of this run, not the model's
    out.diffusion = base.diffusion
    out.diffusion.cond_dropout = dropout
    for key in ("image_size", "channels", "num_classes", "max_text_len", "tokenizer"):
        out.data[key] = base.data[key]
    out.latent = base.latent
    out.text = base.text
    # An inpainting base (its input carries [mask, masked image]) makes an inpainting run;
    # its masks are this run's choice.
    base_inpaints = experiment.is_inpainting(base)
    if experiment.is_inpainting(config) and not base_inpaints:
        raise ValueError(
            f"inpainting.enabled=True, but base_workdir={base_dir} is not an inpainting model "
            "(its input lacks the mask and masked image channels); train the inpainting model "
            "from scratch, or clear inpainting.enabled."
        )
    out.inpainting.enabled = base_inpaints
    return out


def base_params(config: ml_collections.ConfigDict, mesh) -> Any:
    """The EMA params of `config.base_workdir`'s latest good checkpoint (the base of a
    LoRA run, or the start of a full fine-tune)."""
    base = load_workdir_config(config.base_workdir)
    state, _, _ = load_state(base, config.base_workdir, mesh)
    return state.ema_params


def restore_target(parts: Components) -> Any:
    """The abstract train state carrying its target shardings (what restore reshards to)."""
    return abstract_with_shardings(parts.abstract_state, parts.state_sharding)


def model_check(config: ml_collections.ConfigDict, workdir: str):
    """`check(meta)` for a checkpoint's meta: refuses checkpoints of another model."""
    return lambda meta: check_same_model(meta.get("model", {}), config, workdir)


def load_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh,
    step: int | None = None,
    *,
    text_params: Any = None,
) -> tuple[TrainState, int, Components]:
    """Restores the train state of `workdir` (latest good step, or `step`).

    `text_params`: the frozen text encoder's params (or shapes), for a run that trains a
    LoRA on it (`build_components`).

    Raises:
      FileNotFoundError: the workdir has no checkpoint (names the fix).
      WorkdirMismatchError: the checkpoints belong to a different model.
    """
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not has_checkpoints(workdir):
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}. Train first: "
            f"python launch/train.py --config=... --workdir={workdir}"
        )
    ckpt = Checkpointer(ckpt_dir)
    try:
        parts = build_components(config, mesh, text_params=text_params)
        check = model_check(config, workdir)
        if step is None:
            state, step = ckpt.restore_latest(restore_target(parts), check_meta=check)
        else:
            if step not in ckpt.all_steps():
                raise FileNotFoundError(
                    f"No checkpoint for step {step} in {ckpt_dir}; available: {ckpt.all_steps()}."
                )
            check(ckpt.read_meta(step))
            state = ckpt.restore_step(step, restore_target(parts))
    finally:
        ckpt.close()
    return state, step, parts
