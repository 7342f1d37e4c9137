"""A diffusers `scheduler_config.json` <-> a diffjax schedule, sampler method and step grid.

    spec = scheduler_from_config(safetensors_io.read_config(d, "scheduler_config.json"))
    x = samplers.sample(model_fn, noise * spec.noise_scale(20), schedule=spec.schedule(),
                        **spec.sampler_kwargs(20))

reproduces diffusers' own loop (`set_timesteps(20)`, `scale_model_input`, `step`) from
the standard normal `noise`, step for step: the same training schedule, the same
timesteps (what the network sees as `t`), the same update and end point. The model is
called as diffjax calls it, `model_fn(x, t)` with the VP state `x` (diffusers' Euler
state divided by `sqrt(sigma^2 + 1)`, i.e. its `scale_model_input`) and `t` the
diffusers timestep.

Reproduced exactly (`spec.differences == ()`, checked by the fixtures of
`tests/fixtures/make_schedulers.py`):

* `DDIMScheduler` -> `ddim`: any betas, epsilon / v / x0 prediction, zero terminal SNR,
  `timestep_spacing` leading (+ `steps_offset`) for any step count; trailing and
  linspace only where diffusers' step `t -> t - N // n` lands on the next timestep
  (trailing: `N % n == 0`); `set_alpha_to_one=False` ends at alpha_bar[0]
  (`t_final = 0`); `clip_sample` only with `use_clipped_model_output=True` (diffusers'
  default keeps the unclipped eps, diffjax recomputes it from the clipped x0).
* `DDPMScheduler` (`fixed_small`, `fixed_small_log`) -> `ddpm` (same mean and variance;
  its noise draws are JAX's).
* `DPMSolverMultistepScheduler` with `dpmsolver++`, `solver_order` 1 (-> `ddim`) or 2
  with `solver_type='midpoint'` (-> `dpmpp_2m`), any `timestep_spacing`,
  `final_sigmas_type` zero, or sigma_min where its last step is first order.
* `EulerDiscreteScheduler` -> `euler`: leading / trailing, linspace where the timesteps
  are whole numbers, Karras and exponential sigmas.
* `UniPCMultistepScheduler` (bh2, `predict_x0`, `solver_order=2`, `lower_order_final`,
  diffusers' defaults) -> `unipc`, any `timestep_spacing`. Karras sigmas, `solver_order`
  1 or 3, `bh1`, `predict_x0=False` and `disable_corrector` run only with an explicit
  `method=` (listed in `spec.differences`): diffusers rounds its Karras timesteps but not
  its sigmas, and diffjax implements the bh2 data-prediction order-2 form only.

Everything else is refused by name with the reason. Passing `method=` asks for that
diffjax sampler on the scheduler's training schedule and timesteps instead: what then
differs from diffusers' loop is listed in `spec.differences` (and
`spec.grid_differences(n)`), and other scheduler classes are accepted too.

`scheduler_config_for` is the reverse, for export.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffjax.diffusion import samplers, schedules
from diffjax.diffusion.placements import np_eval

DIFFUSERS_VERSION = "0.42.1"

# The diffusers classes reproduced, and the diffjax method each maps to by default.
SUPPORTED = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "UniPCMultistepScheduler": "unipc",
}

_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_SPACINGS = ("leading", "trailing", "linspace")

# Schedulers whose `init_noise_sigma` is `max sigma` (linspace/trailing) or
# `sqrt(max sigma^2 + 1)` (leading), in diffusers' `x / alpha` scaling.
_EULER_FAMILY = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)

_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=0,
    rescale_betas_zero_snr=False,
)

# diffusers 0.42.1's constructor defaults (a saved config may omit any of them).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _COMMON,
        clip_sample=True,
        set_alpha_to_one=True,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
    ),
    "DDPMScheduler": dict(
        _COMMON,
        variance_type="fixed_small",
        clip_sample=True,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
    ),
    "DPMSolverMultistepScheduler": dict(
        _COMMON,
        solver_order=2,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        variance_type=None,
        timestep_spacing="linspace",
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    ),
    "EulerDiscreteScheduler": dict(
        _COMMON,
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        final_sigmas_type="zero",
    ),
    "UniPCMultistepScheduler": dict(
        _COMMON,
        solver_order=2,
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        solver_p=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
        use_dynamic_shifting=False,
        time_shift_type="exponential",
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
    ),
}

# Read only together with an option that is refused or off (thresholding, flow sigmas,
# dynamic shifting); harmless otherwise.
_INERT = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")


class _Refusal:
    """Collects what a config cannot do: `hard` always refused, `soft` only without an
    explicit method (they make diffjax's loop differ from diffusers')."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.hard: list[str] = []
        self.soft: list[str] = []

    def raise_if(self, strict: bool) -> None:
        problems = self.hard + (self.soft if strict else [])
        if not problems:
            return
        tail = ""
        if strict and self.soft:
            tail = (
                "\nPass method=<a diffjax sampler> to run diffjax's sampler on this training "
                "schedule and its timesteps anyway (then these are listed in "
                "spec.differences instead)."
            )
        raise ValueError(
            f"{self.what} cannot be reproduced by diffjax:\n  - " + "\n  - ".join(problems) + tail
        )


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """What a diffusers scheduler config means in diffjax terms.

    Attributes:
      class_name: the diffusers class (`_class_name`).
      schedule_kwargs: keyword arguments of `schedules.make_schedule('discrete_vp', ...)`.
      prediction: `epsilon` | `v` | `x0`.
      method: the diffjax sampler (`samplers.METHODS`).
      clip_x0: clip the x0 prediction to [-1, 1] (diffusers' `clip_sample`).
      t_final: where the last step lands (`samplers.sample(t_final=)`): None for the
        clean point, 0.0 for diffusers' alpha_bar[0] (`set_alpha_to_one=False`,
        `final_sigmas_type='sigma_min'`).
      config: the diffusers config with its defaults filled in.
      strict: True when no method was passed: every step-count dependent difference
        (`grid_differences`) is then refused by `placement`.
      differences: how diffjax's run differs from diffusers' loop (empty: it does not),
        apart from `grid_differences(num_steps)`.
    """

    class_name: str
    schedule_kwargs: dict[str, Any]
    prediction: str
    method: str
    clip_x0: bool
    t_final: float | None
    config: dict[str, Any]
    strict: bool = True
    differences: tuple[str, ...] = ()

    def schedule(self) -> schedules.Schedule:
        """The training schedule (`discrete_vp`)."""
        return schedules.make_schedule("discrete_vp", **self.schedule_kwargs)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """diffusers' `timesteps` after `set_timesteps(num_steps)`, float64 [num_steps]."""
        return _timesteps(self.class_name, self.config, num_steps, self.schedule_kwargs)

    def grid_differences(self, num_steps: int) -> tuple[str, ...]:
        """How diffjax's run with `num_steps` differs from diffusers' (empty: it does not)."""
        return tuple(_grid_problems(self, self.timesteps(num_steps), num_steps))

    def placement(self, num_steps: int) -> np.ndarray:
        """The explicit step placement for `samplers.sample`: diffusers' timesteps.

        Raises:
          ValueError: (strict specs) diffjax's run would differ from diffusers' at this
            step count, with the reason.
        """
        ts = self.timesteps(num_steps)
        problems = _grid_problems(self, ts, num_steps)
        if self.strict and problems:
            raise ValueError(
                f"{self.class_name} with num_steps={num_steps} cannot be reproduced by "
                "diffjax:\n  - "
                + "\n  - ".join(problems)
                + "\nUse another step count or timestep_spacing, or pass method= to "
                "scheduler_from_config to accept diffjax's sampler on these timesteps."
            )
        return ts

    def noise_scale(self, num_steps: int) -> float:
        """The factor on standard normal noise that makes `samplers.sample` start where
        diffusers does.

        diffjax starts at `sigma(t_0) * noise`; diffusers at `noise * init_noise_sigma`,
        which is the VP state `noise` (std 1) for DDIM, DDPM, DPM-Solver and Euler with
        leading spacing (`1 / sigma(t_0)` here), and `sigma(t_0) * noise` for Euler with
        linspace/trailing spacing (1 here).
        """
        spacing = self.config.get("timestep_spacing", "leading")
        if self.class_name in _EULER_FAMILY and spacing in ("linspace", "trailing"):
            return 1.0
        t0 = float(self.timesteps(num_steps)[0])
        sigma0 = float(np_eval(self.schedule().alpha_sigma, t0)[1])
        return 1.0 / sigma0

    def sampler_kwargs(self, num_steps: int, guidance: float | None = None) -> dict[str, Any]:
        """Keyword arguments of `samplers.sample` (with `guidance`: of
        `sample_fn.make_sample_fn`) for a run of `num_steps`."""
        kwargs: dict[str, Any] = dict(
            method=self.method,
            num_steps=num_steps,
            prediction=self.prediction,
            placement=self.placement(num_steps),
            clip_x0=self.clip_x0,
            t_final=self.t_final,
        )
        if guidance is not None:
            kwargs["guidance"] = guidance
        return kwargs


# --------------------------------------------------------------------------- config -> spec


def scheduler_from_config(
    cfg: Mapping[str, Any],
    method: str | None = None,
    *,
    use_clipped_model_output: bool = False,
) -> SchedulerSpec:
    """A diffusers scheduler config (`scheduler_config.json` as a dict) in diffjax terms.

    Args:
      cfg: the config; `_class_name` picks the scheduler, missing options take
        diffusers' defaults, `_`-prefixed metadata is ignored.
      method: None reproduces diffusers' scheduler exactly (and refuses what diffjax
        cannot reproduce); a diffjax sampler name runs that sampler on the config's
        training schedule and timesteps, listing what differs in `spec.differences`.
      use_clipped_model_output: the `step(use_clipped_model_output=)` argument that a
        `DDIMScheduler` with `clip_sample=True` is run with (diffjax matches True).

    Raises:
      ValueError: naming every option value that cannot be honoured, with the reason.
    """
    if not isinstance(cfg, Mapping) or "_class_name" not in cfg:
        raise ValueError(
            "not a diffusers scheduler config: no '_class_name' (expected the contents of "
            "scheduler/scheduler_config.json)"
        )
    cls = str(cfg["_class_name"])
    if method is not None:
        samplers.get_method(method)  # a clear error for unknown names
    known = cls in SUPPORTED
    if not known and method is None:
        raise ValueError(
            f"scheduler {cls!r} has no diffjax sampler that reproduces it; diffjax reproduces "
            f"{sorted(SUPPORTED)}. Pass method=<a diffjax sampler, e.g. 'ddim' or "
            "'dpmpp_2m'> to sample its training schedule with that sampler instead."
        )
    strict = method is None
    ref = _Refusal(f"scheduler config {cls}")
    differences: list[str] = []
    config = dict(_DEFAULTS.get(cls, _COMMON))
    ignored = []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        if known and key not in config:
            if value not in (None, False):
                ref.hard.append(
                    f"unknown option {key}={value!r}: diffjax cannot tell whether it changes "
                    "sampling (written for diffusers <= " + DIFFUSERS_VERSION + ")"
                )
            continue
        if not known and key not in config and key not in ("clip_sample", "set_alpha_to_one"):
            ignored.append(key)
        config[key] = value
    if ignored:
        differences.append(f"{cls}'s own options are not used: {sorted(ignored)}")

    schedule_kwargs, prediction = _schedule_part(config, ref)
    natural = SUPPORTED.get(cls)
    clip_x0 = bool(config.get("clip_sample", False))
    t_final: float | None = None
    if cls == "DDIMScheduler":
        natural = _ddim_part(config, ref, use_clipped_model_output)
        t_final = None if config["set_alpha_to_one"] else 0.0
    elif cls == "DDPMScheduler":
        _ddpm_part(config, ref)
    elif cls == "DPMSolverMultistepScheduler":
        natural, t_final = _dpm_part(config, ref)
    elif cls == "EulerDiscreteScheduler":
        t_final = _euler_part(config, ref)
    elif cls == "UniPCMultistepScheduler":
        t_final = _unipc_part(config, ref)
    else:
        if config.get("set_alpha_to_one", True) is False:
            t_final = 0.0
        if config.get("thresholding", False):
            ref.hard.append("thresholding=True: diffusers' dynamic thresholding is not implemented")
    if clip_x0 and float(config.get("clip_sample_range", 1.0)) != 1.0:
        ref.hard.append(
            f"clip_sample_range={config['clip_sample_range']}: diffjax clips x0 to [-1, 1] only"
        )
    ref.raise_if(strict)

    chosen = natural if method is None else method
    differences += ref.soft
    if chosen != natural:
        differences.append(f"method {chosen!r} instead of {cls}'s own update")
    m = samplers.get_method(chosen)
    if t_final is not None and m.stochastic:
        differences.append(f"{chosen!r} injects noise: its last step goes to the clean point")
        t_final = None
    return SchedulerSpec(
        class_name=cls,
        schedule_kwargs=schedule_kwargs,
        prediction=prediction,
        method=chosen,
        clip_x0=clip_x0,
        t_final=t_final,
        config=config,
        strict=strict,
        differences=tuple(differences),
    )


def _schedule_part(config: dict, ref: _Refusal) -> tuple[dict[str, Any], str]:
    """The training schedule and prediction type (refused if not representable)."""
    if config.get("trained_betas") is not None:
        ref.hard.append(
            "trained_betas: explicit beta tables are not supported (discrete_vp takes "
            f"beta_schedule {sorted(_BETAS)})"
        )
    bs = config.get("beta_schedule")
    if bs not in _BETAS:
        ref.hard.append(
            f"beta_schedule={bs!r}: diffjax's discrete_vp has {sorted(_BETAS)} "
            "(squaredcos_cap_v2 = its 'cosine')"
        )
    pt = config.get("prediction_type")
    if pt not in _PREDICTIONS:
        ref.hard.append(f"prediction_type={pt!r}: diffjax reads {sorted(_PREDICTIONS)} here")
    n = config.get("num_train_timesteps")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        ref.hard.append(f"num_train_timesteps={n!r}: need an integer >= 2")
    spacing = config.get("timestep_spacing")
    if spacing not in _SPACINGS:
        ref.hard.append(f"timestep_spacing={spacing!r}: diffusers has {list(_SPACINGS)}")
    if ref.hard:
        return {}, ""
    kwargs = dict(
        beta_schedule=_BETAS[bs],
        beta_start=float(config["beta_start"]),
        beta_end=float(config["beta_end"]),
        num_timesteps=n,
        zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )
    try:
        schedules.make_schedule("discrete_vp", **kwargs)
    except ValueError as e:
        ref.hard.append(f"betas: {e}")
    return kwargs, _PREDICTIONS[pt]


def _ddim_part(config: dict, ref: _Refusal, use_clipped: bool) -> str:
    if config["thresholding"]:
        ref.hard.append("thresholding=True: diffusers' dynamic thresholding is not implemented")
    if config["clip_sample"] and not use_clipped:
        ref.soft.append(
            "clip_sample=True: diffusers' DDIM step keeps the unclipped eps "
            "(use_clipped_model_output=False), diffjax recomputes eps from the clipped x0 "
            "(pass use_clipped_model_output=True if diffusers is run that way)"
        )
    return "ddim"


def _ddpm_part(config: dict, ref: _Refusal) -> None:
    if config["thresholding"]:
        ref.hard.append("thresholding=True: diffusers' dynamic thresholding is not implemented")
    vt = config["variance_type"]
    if vt not in ("fixed_small", "fixed_small_log"):
        ref.soft.append(
            f"variance_type={vt!r}: diffjax's ddpm uses the posterior variance "
            "(fixed_small / fixed_small_log)"
        )


def _dpm_part(config: dict, ref: _Refusal) -> tuple[str, float | None]:
    for key in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config[key]:
            ref.hard.append(
                f"{key}=True: diffusers' DPM-Solver evaluates the network at whole timesteps "
                "(rounded or truncated) while its state sits at the unrounded sigmas; diffjax "
                "evaluates at the state's own time"
            )
    if config["use_flow_sigmas"] or config["use_dynamic_shifting"]:
        ref.hard.append("use_flow_sigmas / use_dynamic_shifting: flow sigmas are not supported")
    if config["thresholding"]:
        ref.hard.append("thresholding=True: diffusers' dynamic thresholding is not implemented")
    if config["lambda_min_clipped"] != -math.inf:
        ref.hard.append(
            f"lambda_min_clipped={config['lambda_min_clipped']}: only -inf (no clipping) is "
            "implemented"
        )
    if config["variance_type"] not in (None, "learned", "learned_range"):
        ref.hard.append(f"variance_type={config['variance_type']!r} is unknown")
    # learned / learned_range only drop the variance channels (diffjax's sample_fn does).
    algo, order = config["algorithm_type"], config["solver_order"]
    natural = "dpmpp_2m"
    if algo != "dpmsolver++":
        ref.soft.append(
            f"algorithm_type={algo!r}: only 'dpmsolver++' is reproduced "
            "(sde-dpmsolver++ ~ diffjax's dpmpp_2m_sde, not verified)"
        )
    if order == 1:
        natural = "ddim"  # DPM-Solver++ first order is DDIM.
    elif order == 2:
        if config["solver_type"] != "midpoint":
            ref.soft.append(
                f"solver_type={config['solver_type']!r}: diffjax's dpmpp_2m is the midpoint form"
            )
    elif order == 3:
        ref.soft.append(
            "solver_order=3: diffusers' third-order step uses the published phi_3 coefficient "
            "and lower-order warm-up steps; diffjax's dpmpp_3m is the corrected third-order "
            "form (docs/samplers.md), so the two differ"
        )
    else:
        ref.hard.append(f"solver_order={order!r}: diffusers has 1, 2 and 3")
    if config["rescale_betas_zero_snr"]:
        ref.soft.append(_ZERO_SNR_HACK)
    fst = config["final_sigmas_type"]
    if fst not in ("zero", "sigma_min"):
        ref.hard.append(f"final_sigmas_type={fst!r}: diffusers has 'zero' and 'sigma_min'")
    return natural, (0.0 if fst == "sigma_min" else None)


def _unipc_part(config: dict, ref: _Refusal) -> float | None:
    """UniPCMultistepScheduler: diffjax's `unipc` is its default, UniP-2 + UniC-2 (bh2)
    in data prediction with a first-order last step."""
    if config["use_karras_sigmas"]:
        ref.soft.append(
            "use_karras_sigmas=True: diffusers' UniPC evaluates the network at the rounded "
            "timesteps while its state sits at the unrounded Karras sigmas; diffjax "
            "evaluates at the state's own time (the Karras sigmas' unrounded timesteps)"
        )
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        if config[key]:
            ref.hard.append(f"{key}=True: only Karras sigmas are implemented for UniPC")
    if config["use_karras_sigmas"] and (config["sigma_min"] or config["sigma_max"]):
        ref.hard.append("sigma_min / sigma_max: Karras sigmas over the whole table only")
    if config["use_flow_sigmas"] or config["use_dynamic_shifting"] or config["shift_terminal"]:
        ref.hard.append(
            "use_flow_sigmas / use_dynamic_shifting / shift_terminal: flow sigmas are not supported"
        )
    if config["thresholding"]:
        ref.hard.append("thresholding=True: diffusers' dynamic thresholding is not implemented")
    if config["solver_type"] not in ("bh2", "midpoint", "heun", "logrho"):
        # diffusers itself maps the DPM-Solver names to bh2.
        ref.soft.append(
            f"solver_type={config['solver_type']!r}: diffjax's unipc is the bh2 form "
            "(B(h) = e^h - 1); bh1 (B(h) = h) is not implemented"
        )
    if not config["predict_x0"]:
        ref.soft.append(
            "predict_x0=False: diffjax's unipc is UniPC's data-prediction form; the "
            "noise-prediction form is not implemented"
        )
    if config["solver_order"] != 2:
        ref.soft.append(
            f"solver_order={config['solver_order']!r}: diffjax's unipc is UniP-2 + UniC-2 "
            "(diffusers' default order 2)"
        )
    if not config["lower_order_final"]:
        ref.hard.append(
            "lower_order_final=False: diffusers' second-order last step into sigma = 0 is "
            "infinite (h = inf); diffjax's unipc ends with a first-order step, as "
            "lower_order_final=True does"
        )
    if config["disable_corrector"]:
        ref.soft.append(
            f"disable_corrector={config['disable_corrector']!r}: diffjax's unipc applies UniC "
            "at every step but the last"
        )
    if config["solver_p"] is not None:
        ref.hard.append("solver_p: an external predictor is not supported")
    if config["rescale_betas_zero_snr"]:
        ref.soft.append(_ZERO_SNR_HACK)
    fst = config["final_sigmas_type"]
    if fst == "sigma_min":
        ref.soft.append(
            "final_sigmas_type='sigma_min': diffusers' UniPC steps from the corrected last "
            "state to alpha_bar[0]; diffjax's t_final step leaves the uncorrected one"
        )
        return 0.0
    if fst != "zero":
        ref.hard.append(f"final_sigmas_type={fst!r}: diffusers has 'zero' and 'sigma_min'")
    return None


_ZERO_SNR_HACK = (
    "rescale_betas_zero_snr=True: this diffusers scheduler sets alpha_bar[-1] = 2**-24 "
    "(sigma 4096) instead of 0, diffjax's zero-terminal-SNR schedule has alpha_bar = 0 "
    "exactly (x0 predictions at t = N-1 differ by ~2.4e-4 * x_T)"
)


def _euler_part(config: dict, ref: _Refusal) -> float | None:
    if config["use_beta_sigmas"]:
        ref.hard.append("use_beta_sigmas=True: beta sigmas are not implemented")
    if config["use_karras_sigmas"] and config["use_exponential_sigmas"]:
        ref.hard.append("use_karras_sigmas and use_exponential_sigmas: choose one")
    if config["interpolation_type"] != "linear":
        ref.hard.append(
            f"interpolation_type={config['interpolation_type']!r}: only 'linear' is implemented"
        )
    if config["timestep_type"] == "continuous" and config["prediction_type"] == "v_prediction":
        ref.hard.append(
            "timestep_type='continuous' with v_prediction: the network takes 0.25 log(sigma), "
            "not the discrete timestep diffjax passes"
        )
    if config["rescale_betas_zero_snr"]:
        if config["use_karras_sigmas"] or config["use_exponential_sigmas"]:
            ref.hard.append("rescale_betas_zero_snr with Karras/exponential sigmas")
        ref.soft.append(_ZERO_SNR_HACK)
    fst = config["final_sigmas_type"]
    if fst == "sigma_min":
        ref.soft.append(
            "final_sigmas_type='sigma_min': diffusers' Euler ends at sigma_min in its x / alpha "
            "scaling (x_0 / alpha_bar[0]**0.5), diffjax at t_final = 0 in the VP state"
        )
        return 0.0
    if fst != "zero":
        ref.hard.append(f"final_sigmas_type={fst!r}: diffusers has 'zero' and 'sigma_min'")
    return None


# --------------------------------------------------------------------------- timesteps


def _sigma_table(schedule_kwargs: Mapping[str, Any], *, float32: bool = False) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) at the integer timesteps, float64 [N].

    `float32`: computed as diffusers does (float32 betas and alpha_bar, the cumulative
    product accumulated in float64 as torch does, sigma in float32), whose rounding
    moves sigma near t = 0 by up to ~1e-4 relative (1 - alpha_bar cancels).
    """
    k = schedule_kwargs
    betas = schedules.discrete_betas(
        k["beta_schedule"], k["beta_start"], k["beta_end"], k["num_timesteps"]
    )
    if float32 and not k["zero_terminal_snr"]:
        one = np.float32(1.0)
        abar32 = np.cumprod((one - betas.astype(np.float32)).astype(np.float64))
        abar32 = abar32.astype(np.float32)
        return np.sqrt((one - abar32) / abar32).astype(np.float64)
    abar = np.cumprod(1.0 - betas)
    if k["zero_terminal_snr"]:
        abar = schedules.rescale_zero_terminal_snr(abar)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - abar) / abar)


def _spaced(spacing: str, n_train: int, n: int, offset: int, *, plus_one: bool) -> np.ndarray:
    """DDIM/DDPM/Euler spacings (`plus_one`: DPM-Solver's, which spaces n + 1 points)."""
    if spacing == "leading":
        if plus_one:
            ratio = n_train // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1]
        else:
            ratio = n_train // n
            ts = (np.arange(0, n) * ratio).round()[::-1]
        return ts.astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / n)).astype(np.float64) - 1.0
    if plus_one:
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.float64)
    return np.linspace(0, n_train - 1, n)[::-1].copy()


def _timesteps(cls: str, config: Mapping[str, Any], n: int, sk: Mapping[str, Any]) -> np.ndarray:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {n!r}")
    n = int(n)
    n_train = int(config["num_train_timesteps"])
    if n > n_train:
        raise ValueError(f"num_steps={n} exceeds num_train_timesteps={n_train}")
    spacing, offset = config["timestep_spacing"], int(config.get("steps_offset", 0) or 0)
    if cls == "DPMSolverMultistepScheduler":
        return _spaced(spacing, n_train, n, offset, plus_one=True)
    if cls == "UniPCMultistepScheduler":
        if config.get("use_karras_sigmas"):
            return _unipc_karras_times(sk, n)
        return _spaced(spacing, n_train, n, offset, plus_one=True)
    ts = _spaced(spacing, n_train, n, offset, plus_one=False)
    if cls not in _EULER_FAMILY:
        return np.round(ts) if spacing == "linspace" else ts
    ts = ts.astype(np.float32).astype(np.float64)  # Euler keeps float32 timesteps
    kind = (
        "karras"
        if config.get("use_karras_sigmas")
        else "exponential"
        if config.get("use_exponential_sigmas")
        else None
    )
    if kind is None:
        return ts
    table = _sigma_table(sk, float32=True)
    at = np.interp(ts, np.arange(n_train), table)
    smax = config.get("sigma_max") or at[0]
    smin = config.get("sigma_min") or at[-1]
    if kind == "karras":
        rho = 7.0
        ramp = np.linspace(0.0, 1.0, n)
        sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    else:
        sig = np.exp(np.linspace(math.log(smax), math.log(smin), n))
    # diffusers' sigma -> t: linear interpolation of the timestep in log(sigma).
    t = np.interp(np.log(np.maximum(sig, 1e-10)), np.log(table), np.arange(n_train))
    return t.astype(np.float32).astype(np.float64)


def _unipc_karras_times(sk: Mapping[str, Any], n: int) -> np.ndarray:
    """The (unrounded) timesteps of UniPC's Karras sigmas: rho 7 over the whole float32
    sigma table, mapped to t by linear interpolation in log(sigma) as diffusers does
    (which then rounds the timesteps the network sees, not the sigmas)."""
    table = _sigma_table(sk, float32=True)
    smax, smin = table[-1], table[0]
    rho = 7.0
    ramp = np.linspace(0.0, 1.0, n)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = np.interp(np.log(np.maximum(sig, 1e-10)), np.log(table), np.arange(table.size))
    return t.astype(np.float32).astype(np.float64)


def _grid_problems(spec: SchedulerSpec, ts: np.ndarray, n: int) -> list[str]:
    """Step-count dependent differences between diffusers' loop and diffjax's run."""
    cfg, cls = spec.config, spec.class_name
    n_train = int(cfg["num_train_timesteps"])
    out = []
    if np.any(ts < 0) or np.any(ts > n_train - 1) or (n > 1 and np.any(np.diff(ts) >= 0)):
        return [f"timesteps {ts.tolist()} are not distinct and within [0, {n_train - 1}]"]
    if cls == "DDIMScheduler":
        stride = n_train // n
        prev = ts - stride
        bad = [i for i in range(n - 1) if prev[i] != ts[i + 1]]
        if bad:
            i = bad[0]
            out.append(
                f"diffusers' DDIM steps from t to t - N//num_steps ({int(ts[i])} -> "
                f"{int(prev[i])}), which is not the next timestep {int(ts[i + 1])} "
                f"(timestep_spacing={cfg['timestep_spacing']!r}); diffjax steps between "
                "timesteps"
            )
        if prev[-1] >= 0:
            out.append(f"diffusers' last DDIM step lands on timestep {int(prev[-1])}, not the end")
    if (
        cls in ("DDIMScheduler", "DDPMScheduler")
        and cfg.get("rescale_betas_zero_snr")
        and spec.prediction == "epsilon"
        and ts[0] == n_train - 1
    ):
        out.append(
            "epsilon prediction at zero terminal SNR starting at t = N-1: diffusers divides by "
            "alpha_bar = 0 there (diffjax asks the network at N-2 instead)"
        )
    if (
        cls == "EulerDiscreteScheduler"
        and not (cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"])
        and np.any(ts != np.round(ts))
    ):
        out.append(
            "fractional timesteps (timestep_spacing='linspace' with (N-1) % (num_steps-1) != 0): "
            "diffusers interpolates sigma linearly between timesteps, diffjax log-SNR "
            "(sigma differs by up to ~2e-4 relative)"
        )
    if (
        cls == "DPMSolverMultistepScheduler"
        and cfg["final_sigmas_type"] == "sigma_min"
        and cfg["solver_order"] >= 2
        and not (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15))
    ):
        out.append(
            "final_sigmas_type='sigma_min' with a second-order last step (num_steps >= 15 or "
            "lower_order_final=False, euler_at_final=False): diffjax's step to t_final is first "
            "order"
        )
    return out


# --------------------------------------------------------------------------- spec -> config

_DISCRETE_ARGS = schedules.schedule_arguments("discrete_vp")
_DISCRETE_DEFAULTS = {
    k: p.default for k, p in inspect.signature(schedules.discrete_vp).parameters.items()
}


def scheduler_config_for(
    schedule_hparams: Mapping[str, Any] | schedules.Schedule,
    prediction: str,
    method: str,
    placement: str | None = None,
    *,
    clip_x0: bool = False,
    t_final: float | None = None,
) -> dict[str, Any]:
    """A diffusers scheduler config that reproduces a diffjax discrete schedule + sampler.

    Loaded by diffusers (`SchedulerClass.from_config`), its `set_timesteps(n)` + `step`
    loop matches `samplers.sample(..., method=method, placement=placement)` on the
    schedule (with `noise_scale`, see `SchedulerSpec`), and `scheduler_from_config` maps
    it back.

    * `ddim` -> DDIMScheduler, placements `leading_sd` (steps_offset 1), `leading`,
      `trailing` (exact when num_steps divides N: diffusers' DDIM steps t -> t - N//n);
      `t_final=0.0` -> `set_alpha_to_one=False`; with `clip_x0` diffusers must step with
      `use_clipped_model_output=True` (its default keeps the unclipped eps).
    * `ddpm` -> DDPMScheduler (`fixed_small`), placements leading_sd / leading /
      trailing / linspace; `clip_x0` -> `clip_sample`.
    * `euler` -> EulerDiscreteScheduler, leading_sd / leading / trailing, `karras`
      (Karras sigmas over the whole table, rho 7).
    * `dpmpp_2m` -> DPMSolverMultistepScheduler (dpmsolver++, midpoint), placement
      `trailing`; `t_final=0.0` -> `final_sigmas_type='sigma_min'`, `euler_at_final`.
    * `unipc` -> UniPCMultistepScheduler (bh2, predict_x0, order 2, lower_order_final),
      placement `trailing`.

    Args:
      schedule_hparams: a `discrete_vp` schedule or its `hparams` (missing keys take
        discrete_vp's defaults).
      prediction: `epsilon` | `v` | `x0`.
      method: a diffjax sampler name.
      placement: a placement name; None is the method's default on discrete schedules.
      clip_x0: the run clips x0 to [-1, 1].
      t_final: the run's `t_final` (None or 0.0).

    Raises:
      ValueError: a non-discrete schedule, or a method/placement/option with no diffusers
        equivalent, with the reason.
    """
    hp = _discrete_hparams(schedule_hparams)
    problems = []
    inv_pred = {v: k for k, v in _PREDICTIONS.items()}
    if prediction not in inv_pred:
        problems.append(
            f"prediction={prediction!r}: diffusers' DDPM-family schedulers take {sorted(inv_pred)}"
        )
    m = samplers.get_method(method)
    if placement is None:
        placement = m.placements.discrete
    if not isinstance(placement, str):
        problems.append(
            "an explicit placement: a scheduler config cannot hold explicit timesteps (pass "
            "them to set_timesteps(timesteps=...) at run time)"
        )
        placement = "<explicit>"
    if t_final is not None and float(t_final) != 0.0:
        problems.append(f"t_final={t_final}: diffusers can end at alpha_bar[0] (0.0) or clean")
    zsnr = hp["zero_terminal_snr"]
    base = dict(
        num_train_timesteps=hp["num_timesteps"],
        beta_start=hp["beta_start"],
        beta_end=hp["beta_end"],
        beta_schedule={v: k for k, v in _BETAS.items()}[hp["beta_schedule"]],
        trained_betas=None,
        prediction_type=inv_pred.get(prediction, prediction),
        rescale_betas_zero_snr=zsnr,
        steps_offset=0,
    )
    spacing = {"leading": "leading", "leading_sd": "leading", "trailing": "trailing"}
    if placement == "leading_sd":
        base["steps_offset"] = 1
    cls: str | None = None
    extra: dict[str, Any] = {}
    if method == "ddim":
        cls = "DDIMScheduler"
        if placement not in spacing:
            problems.append(
                f"placement {placement!r} with ddim: diffusers' DDIM steps t -> t - N//n, which "
                "follows only leading / leading_sd / trailing (num_steps dividing N) grids"
            )
        if zsnr and prediction == "epsilon" and placement == "trailing":
            problems.append(
                "epsilon prediction at zero terminal SNR with trailing: diffusers' DDIM divides "
                "by alpha_bar = 0 at t = N-1"
            )
        extra = dict(
            clip_sample=bool(clip_x0),
            clip_sample_range=1.0,
            set_alpha_to_one=t_final is None,
            thresholding=False,
            timestep_spacing=spacing.get(placement, placement),
        )
    elif method == "ddpm":
        cls = "DDPMScheduler"
        spacing["linspace"] = "linspace"
        if placement not in spacing:
            problems.append(
                f"placement {placement!r} with ddpm: diffusers' DDPM has leading / leading_sd / "
                "trailing / linspace"
            )
        if t_final is not None:
            problems.append("t_final with ddpm: diffusers' DDPM always ends at the clean point")
        if zsnr and prediction == "epsilon" and placement in ("trailing", "linspace"):
            problems.append(
                "epsilon prediction at zero terminal SNR starting at t = N-1: diffusers' DDPM "
                "divides by alpha_bar = 0 there"
            )
        extra = dict(
            variance_type="fixed_small",
            clip_sample=bool(clip_x0),
            clip_sample_range=1.0,
            thresholding=False,
            timestep_spacing=spacing.get(placement, placement),
        )
    elif method == "euler":
        cls = "EulerDiscreteScheduler"
        if placement == "karras":
            extra = dict(use_karras_sigmas=True, timestep_spacing="linspace")
        elif placement in spacing:
            extra = dict(use_karras_sigmas=False, timestep_spacing=spacing[placement])
        else:
            problems.append(
                f"placement {placement!r} with euler: diffusers' Euler has leading / leading_sd "
                "/ trailing / karras (its linspace is not rounded to whole timesteps)"
            )
        extra.update(interpolation_type="linear", final_sigmas_type="zero")
        problems += _no_zero_snr_clip_tfinal("euler", zsnr, clip_x0, t_final)
    elif method == "dpmpp_2m":
        cls = "DPMSolverMultistepScheduler"
        if placement != "trailing":
            problems.append(
                f"placement {placement!r} with dpmpp_2m: only 'trailing' has a diffusers "
                "equivalent (its leading/linspace space n+1 points, use_lu_lambdas rounds the "
                "timesteps but not the sigmas)"
            )
        problems += _no_zero_snr_clip_tfinal("dpmpp_2m", zsnr, clip_x0, None)
        extra = dict(
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=t_final is not None,
            final_sigmas_type="zero" if t_final is None else "sigma_min",
            timestep_spacing="trailing",
        )
    elif method == "unipc":
        cls = "UniPCMultistepScheduler"
        if placement != "trailing":
            problems.append(
                f"placement {placement!r} with unipc: only 'trailing' has a diffusers "
                "equivalent (its leading/linspace space n+1 points, its Karras timesteps are "
                "rounded but not its sigmas)"
            )
        problems += _no_zero_snr_clip_tfinal("unipc", zsnr, clip_x0, t_final)
        extra = dict(
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            disable_corrector=[],
            use_karras_sigmas=False,
            final_sigmas_type="zero",
            timestep_spacing="trailing",
        )
    else:
        problems.append(
            f"method {method!r} has no diffusers scheduler that reproduces it (reproduced: ddim, "
            "ddpm, euler, dpmpp_2m, unipc; diffusers' 3M uses the published, not the corrected, "
            "third-order step)"
        )
    if problems:
        raise ValueError(
            f"no diffusers scheduler config reproduces method={method!r}, placement="
            f"{placement!r}:\n  - " + "\n  - ".join(problems)
        )
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **base, **extra}


def _no_zero_snr_clip_tfinal(
    method: str, zsnr: bool, clip_x0: bool, t_final: float | None
) -> list[str]:
    out = []
    if zsnr:
        out.append(f"zero terminal SNR with {method}: " + _ZERO_SNR_HACK)
    if clip_x0:
        out.append(f"clip_x0 with {method}: its diffusers scheduler does not clip")
    if t_final is not None:
        out.append(f"t_final with {method}: its diffusers scheduler ends at the clean point")
    return out


def _discrete_hparams(h: Mapping[str, Any] | schedules.Schedule) -> dict[str, Any]:
    if isinstance(h, schedules.Schedule):
        if h.name != "discrete_vp":
            raise ValueError(
                f"schedule {h.name!r} has no diffusers DDPM-family scheduler: those are "
                "discrete (beta tables); export a discrete_vp schedule"
            )
        h = h.hparams
    h = dict(h)
    name = h.pop("name", "discrete_vp")
    unknown = sorted(set(h) - set(_DISCRETE_ARGS))
    if name != "discrete_vp" or unknown:
        raise ValueError(
            f"not a discrete_vp schedule (name {name!r}, fields {unknown or sorted(h)}): "
            "diffusers' DDPM-family schedulers are discrete (beta tables); export a "
            "discrete_vp schedule"
        )
    out = {**_DISCRETE_DEFAULTS, **h}
    schedules.make_schedule("discrete_vp", **out)  # validates
    return out
