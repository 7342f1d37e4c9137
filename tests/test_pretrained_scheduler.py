"""diffusers scheduler configs <-> diffjax schedules and samplers, against diffusers' loops.

The fixtures (tests/fixtures/schedulers, made by tests/fixtures/make_schedulers.py) hold
diffusers' own `set_timesteps` / `scale_model_input` / `step` loops with the closed-form
"network" `0.5 tanh(x) + 1e-4 t`; diffjax must give the same timesteps and the same
states at every step (1e-5 relative) from the same standard normal noise.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import parametrizations, samplers, schedules
from diffjax.pretrained import scheduler as S

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "schedulers")
RTOL = 1e-5


def _load(case: str) -> tuple[dict, dict]:
    with open(os.path.join(ROOT, case, "scheduler_config.json")) as f:
        cfg = json.load(f)
    with np.load(os.path.join(ROOT, case, "reference.npz")) as z:
        return cfg, dict(z)


def model(x, t):
    return 0.5 * jnp.tanh(x) + 1e-4 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def _vp_trajectory(ref: dict, n: int, key: str = "traj") -> np.ndarray:
    """diffusers' states in diffjax's VP scaling (Euler keeps x / alpha)."""
    traj = ref[f"n{n}_{key}"].astype(np.float64)
    if f"n{n}_sigmas" in ref and ref[f"n{n}_init_sigma"] != 1.0:  # Euler
        scale = 1.0 / np.sqrt(ref[f"n{n}_sigmas"] ** 2 + 1.0)  # the state after each step
        traj = traj * scale[:, None, None, None, None]
    return traj


def _rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per state: max |difference| / max |reference|."""
    axes = tuple(range(1, want.ndim))
    return np.abs(got - want).max(axis=axes) / np.abs(want).max(axis=axes)


def _run(spec: S.SchedulerSpec, ref: dict, n: int) -> np.ndarray:
    noise = jnp.asarray(ref["noise"]) * spec.noise_scale(n)
    _, traj = samplers.sample(
        model, noise, schedule=spec.schedule(), return_trajectory=True, **spec.sampler_kwargs(n)
    )
    return np.asarray(traj, np.float64)


# case -> (scheduler_from_config keywords, expected method, trajectory key)
EXACT = {
    "ddim_sd15": ({}, "ddim", "traj"),
    "ddim_trailing_zsnr_v": ({}, "ddim", "traj"),
    "ddim_linear_clip": ({"use_clipped_model_output": True}, "ddim", "traj_clipped"),
    "ddim_cosine_sample": ({}, "ddim", "traj"),
    "dpm1_trailing": ({}, "ddim", "traj"),
    "dpm2": ({}, "dpmpp_2m", "traj"),
    "dpm2_trailing_v": ({}, "dpmpp_2m", "traj"),
    "euler_leading": ({}, "euler", "traj"),
    "euler_linspace": ({}, "euler", "traj"),
    "euler_karras_v": ({}, "euler", "traj"),
    "euler_exponential_trailing": ({}, "euler", "traj"),
    "unipc_sd": ({}, "unipc", "traj"),
    "unipc_trailing_v": ({}, "unipc", "traj"),
    "unipc_leading": ({}, "unipc", "traj"),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_reproduces_diffusers_step_for_step(case):
    cfg, ref = _load(case)
    kwargs, method, key = EXACT[case]
    spec = S.scheduler_from_config(cfg, **kwargs)
    assert spec.method == method and spec.differences == ()
    for n in (int(s) for s in ref["steps"]):
        if case == "euler_linspace" and n == 20:
            continue  # fractional timesteps: test_euler_fractional_timesteps
        want_ts = ref[f"n{n}_timesteps"]
        got_ts = spec.placement(n)
        if np.all(want_ts == np.round(want_ts)):
            np.testing.assert_array_equal(got_ts, want_ts)
        else:  # Karras / exponential sigmas: float32 rounding of diffusers' sigma -> t
            np.testing.assert_allclose(got_ts, want_ts, rtol=0, atol=2e-4)
        assert spec.grid_differences(n) == ()
        err = _rel_err(_run(spec, ref, n), _vp_trajectory(ref, n, key))
        assert err.max() < RTOL, (case, n, err)


def test_sd15_ddim_spec():
    cfg, _ = _load("ddim_sd15")
    spec = S.scheduler_from_config(cfg)
    assert spec.schedule_kwargs == dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_timesteps=1000,
        zero_terminal_snr=False,
    )
    assert (spec.prediction, spec.clip_x0, spec.t_final) == ("epsilon", False, 0.0)
    # diffjax's own leading_sd placement is SD's spacing.
    np.testing.assert_array_equal(
        spec.placement(10), samplers.step_times(spec.schedule(), 10, "leading_sd")
    )
    kw = spec.sampler_kwargs(10, guidance=7.5)
    assert kw["guidance"] == 7.5 and kw["t_final"] == 0.0 and kw["method"] == "ddim"


def test_predictions_and_cosine_betas():
    cfg, _ = _load("ddim_trailing_zsnr_v")
    spec = S.scheduler_from_config(cfg)
    assert spec.prediction == "v" and spec.schedule_kwargs["zero_terminal_snr"]
    assert spec.noise_scale(4) == 1.0  # starts at SNR 0: sigma(t_0) = 1
    cfg, _ = _load("ddim_cosine_sample")
    spec = S.scheduler_from_config(cfg)
    assert spec.prediction == "x0" and spec.schedule_kwargs["beta_schedule"] == "cosine"


def test_ddpm_matches_diffusers_mean_and_variance():
    """DDPM is stochastic: replay diffusers' own noise draws through diffjax's ddpm
    coefficient tables (the ones `sample` runs), with the same clipping."""
    cfg, ref = _load("ddpm_linear_clip")
    spec = S.scheduler_from_config(cfg)
    assert (spec.method, spec.clip_x0, spec.t_final) == ("ddpm", True, None)
    sch = spec.schedule()
    for n in (int(s) for s in ref["steps"]):
        ts = spec.placement(n)
        np.testing.assert_array_equal(ts, ref[f"n{n}_timesteps"])
        tab = samplers._build_tables(
            sch,
            ts,
            samplers.METHODS["ddpm"],
            spec.prediction,
            eta=0.0,
            s_churn=0.0,
            s_tmin=0.0,
            s_tmax=float("inf"),
            s_noise=1.0,
            num_total=n,
        )
        ev, st = tab.ev, tab.step
        x = jnp.asarray(ref["noise"], jnp.float32) * spec.noise_scale(n) * ev["s_pt"][0]
        states = [x]
        for i in range(n):
            t = jnp.full((x.shape[0],), ts[i], jnp.float32)
            x0, _ = parametrizations.to_x0_eps(
                model(x, t), x, ev["a_ev"][i], ev["s_ev"][i], spec.prediction
            )
            x0 = jnp.clip(x0, -1.0, 1.0)
            if i == n - 1:
                x = x0
            else:
                z = jnp.asarray(ref[f"n{n}_step_noise"][i])
                x = st["cx"][i] * x + st["c0"][i] * x0 + st["cz"][i] * z
            states.append(x)
        err = _rel_err(np.stack(states), _vp_trajectory(ref, n))
        assert err.max() < RTOL, (n, err)


# ----------------------------------------------------------------------------- refusals


def test_ddim_clip_sample_needs_clipped_model_output():
    cfg, ref = _load("ddim_linear_clip")
    with pytest.raises(ValueError, match=r"clip_sample=True.*use_clipped_model_output"):
        S.scheduler_from_config(cfg)
    # With method= the difference is listed, and it is real.
    spec = S.scheduler_from_config(cfg, method="ddim")
    assert any("clip_sample" in d for d in spec.differences)
    err = _rel_err(_run(spec, ref, 4), _vp_trajectory(ref, 4))
    assert err[-1] > 1e-3


def test_ddim_inconsistent_grid_refused():
    cfg, ref = _load("ddim_linspace")
    spec = S.scheduler_from_config(cfg)  # fine until a step count is chosen
    with pytest.raises(ValueError, match=r"t - N//num_steps \(999 -> 749\).*next timestep 666"):
        spec.placement(4)
    with pytest.raises(ValueError, match="t - N//num_steps"):
        spec.sampler_kwargs(20)
    # trailing is consistent only when num_steps divides N.
    trailing = S.scheduler_from_config({**cfg, "timestep_spacing": "trailing"})
    trailing.placement(20)
    with pytest.raises(ValueError, match="not the next timestep"):
        trailing.placement(7)
    loose = S.scheduler_from_config(cfg, method="ddim")
    assert loose.grid_differences(4) and not loose.strict
    np.testing.assert_array_equal(loose.placement(4), ref["n4_timesteps"])


def test_euler_fractional_timesteps():
    cfg, ref = _load("euler_linspace")
    with pytest.raises(ValueError, match="fractional timesteps"):
        S.scheduler_from_config(cfg).placement(20)
    spec = S.scheduler_from_config(cfg, method="euler")
    np.testing.assert_array_equal(spec.placement(20), ref["n20_timesteps"])
    err = _rel_err(_run(spec, ref, 20), _vp_trajectory(ref, 20))
    assert err.max() < 1e-3  # close: sigma interpolated in log-SNR, not linearly


def test_dpm_solver_order_3_refused_then_explicit():
    cfg, ref = _load("dpm3")
    with pytest.raises(ValueError, match=r"solver_order=3.*published phi_3"):
        S.scheduler_from_config(cfg)
    spec = S.scheduler_from_config(cfg, method="dpmpp_3m")
    assert spec.method == "dpmpp_3m" and any("solver_order=3" in d for d in spec.differences)
    np.testing.assert_array_equal(spec.placement(20), ref["n20_timesteps"])
    err = _rel_err(_run(spec, ref, 20), _vp_trajectory(ref, 20))
    assert err[-1] < 1e-2  # the same grid and a third-order method: close, not equal


def test_unipc_karras_sigmas_refused_then_explicit():
    """diffusers' UniPC rounds its Karras timesteps (what the network sees) but not its
    sigmas; diffjax puts the state on the same sigmas and evaluates there."""
    cfg, ref = _load("unipc_karras")
    with pytest.raises(ValueError, match=r"use_karras_sigmas=True: .*rounded timesteps"):
        S.scheduler_from_config(cfg)
    spec = S.scheduler_from_config(cfg, method="unipc")
    assert any("use_karras_sigmas" in d for d in spec.differences)
    ts = spec.placement(10)
    np.testing.assert_array_equal(np.round(ts), ref["n10_timesteps"])
    a, s = (np.asarray(v, np.float64) for v in jax.vmap(spec.schedule().alpha_sigma)(ts))
    np.testing.assert_allclose(s / a, ref["n10_sigmas"][:-1], rtol=2e-4)
    err = _rel_err(_run(spec, ref, 10), _vp_trajectory(ref, 10))
    assert err.max() < 2e-5, err  # measured 7.6e-6 (the model's 1e-4 t term)


UNIPC = {"_class_name": "UniPCMultistepScheduler"}


@pytest.mark.parametrize(
    "change, pattern, soft",
    [
        ({"solver_type": "bh1"}, "solver_type='bh1'.*bh1 .* not implemented", True),
        ({"predict_x0": False}, "predict_x0=False", True),
        ({"solver_order": 3}, "solver_order=3", True),
        ({"disable_corrector": [0, 1]}, "disable_corrector=\\[0, 1\\]", True),
        ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type='sigma_min'", True),
        ({"rescale_betas_zero_snr": True}, "2\\*\\*-24", True),
        ({"lower_order_final": False}, "lower_order_final=False.*infinite", False),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas", False),
        ({"use_flow_sigmas": True}, "use_flow_sigmas", False),
        ({"thresholding": True}, "thresholding=True", False),
        ({"prediction_type": "flow_prediction"}, "flow_prediction", False),
    ],
)
def test_unipc_options_refused_by_name(change, pattern, soft):
    with pytest.raises(ValueError, match=pattern):
        S.scheduler_from_config({**UNIPC, **change})
    if soft:  # diffjax's unipc on these timesteps, the difference listed
        spec = S.scheduler_from_config({**UNIPC, **change}, method="unipc")
        assert spec.differences and spec.method == "unipc"
    else:
        with pytest.raises(ValueError, match=pattern):
            S.scheduler_from_config({**UNIPC, **change}, method="unipc")


def test_unipc_defaults_and_solver_type_aliases():
    spec = S.scheduler_from_config(UNIPC)
    assert (spec.method, spec.prediction, spec.t_final, spec.clip_x0) == (
        "unipc",
        "epsilon",
        None,
        False,
    )
    # diffusers registers the DPM-Solver names as bh2.
    assert S.scheduler_from_config({**UNIPC, "solver_type": "midpoint"}).differences == ()
    np.testing.assert_array_equal(spec.placement(4), [999, 749, 500, 250])  # n + 1 points
    assert spec.noise_scale(4) == pytest.approx(1.0 / float(spec.schedule().alpha_sigma(999.0)[1]))


BASE = {"_class_name": "DDIMScheduler", "clip_sample": False}


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"trained_betas": [0.1] * 10}, "trained_betas"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
        ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
        ({"thresholding": True}, "thresholding=True"),
        ({"clip_sample": True, "clip_sample_range": 2.0}, "clip_sample_range=2.0"),
        ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
        ({"some_new_option": 3}, "unknown option some_new_option=3"),
        ({"_class_name": "PNDMScheduler"}, "'PNDMScheduler' has no diffjax sampler"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
            "use_karras_sigmas=True: .*rounded",
        ),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
            "algorithm_type='sde-dpmsolver\\+\\+'",
        ),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_type": "heun"}, "solver_type"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -5.1},
            "lambda_min_clipped=-5.1",
        ),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "rescale_betas_zero_snr": True},
            "2\\*\\*-24",
        ),
        (
            {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"},
            "interpolation_type='log_linear'",
        ),
        ({"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": True}, "use_beta_sigmas"),
        (
            {
                "_class_name": "EulerDiscreteScheduler",
                "timestep_type": "continuous",
                "prediction_type": "v_prediction",
            },
            "0.25 log\\(sigma\\)",
        ),
        (
            {"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "sigma_min"},
            "final_sigmas_type='sigma_min'",
        ),
        ({"_class_name": "DDPMScheduler", "variance_type": "fixed_large"}, "fixed_large"),
    ],
)
def test_unsupported_options_refused_by_name(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.scheduler_from_config({**BASE, **change})


def test_refusals_that_depend_on_the_step_count():
    zsnr_eps = S.scheduler_from_config(
        {**BASE, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    )
    with pytest.raises(ValueError, match="divides by alpha_bar = 0"):
        zsnr_eps.placement(10)
    dpm = {
        "_class_name": "DPMSolverMultistepScheduler",
        "final_sigmas_type": "sigma_min",
        "timestep_spacing": "trailing",
    }
    spec = S.scheduler_from_config(dpm)
    assert spec.t_final == 0.0
    spec.placement(10)  # lower_order_final below 15 steps: a first-order last step
    with pytest.raises(ValueError, match="second-order last step"):
        spec.placement(20)
    S.scheduler_from_config({**dpm, "euler_at_final": True}).placement(20)


def test_harmless_metadata_and_defaults():
    spec = S.scheduler_from_config(
        {**BASE, "_diffusers_version": "0.9.0", "_use_default_values": ["x"], "future": None}
    )
    assert spec.config["timestep_spacing"] == "leading" and spec.t_final is None
    ddim = {"_class_name": "DDIMScheduler"}  # clip_sample defaults to True
    assert S.scheduler_from_config(ddim, use_clipped_model_output=True).clip_x0
    with pytest.raises(ValueError, match="_class_name"):
        S.scheduler_from_config({"beta_start": 0.1})
    with pytest.raises(ValueError, match="unknown sampler method 'nope'"):
        S.scheduler_from_config(BASE, method="nope")


def test_other_classes_with_an_explicit_method():
    pndm = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    }
    spec = S.scheduler_from_config(pndm, method="dpmpp_2m")
    assert spec.method == "dpmpp_2m" and spec.t_final == 0.0 and not spec.strict
    assert any("skip_prk_steps" in d for d in spec.differences)
    np.testing.assert_array_equal(spec.placement(4), [751, 501, 251, 1])
    spec = S.scheduler_from_config(pndm, method="ddpm")
    assert spec.t_final is None  # stochastic: ends at the clean point


# ----------------------------------------------------------------------------- t_final


def test_t_final_is_a_ddim_step_from_the_last_evaluation():
    sch = schedules.make_schedule("discrete_vp")
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)), jnp.float32)
    kw = dict(schedule=sch, num_steps=3, placement=[500.0, 200.0, 20.0])
    key = jax.random.key(0)
    x0, traj = samplers.sample(model, noise, method="ddim", return_trajectory=True, **kw)
    got = samplers.sample(model, noise, method="ddim", t_final=0.0, **kw)
    x_last = traj[-2]
    a, s = (float(v) for v in sch.alpha_sigma(jnp.float32(20.0)))
    eps = model(x_last, jnp.full((2,), 20.0))
    a0, s0 = (float(v) for v in sch.alpha_sigma(jnp.float32(0.0)))
    np.testing.assert_allclose(got, a0 * x0 + s0 * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x0, (x_last - s * eps) / a, rtol=1e-5, atol=1e-6)
    # Deterministic methods take it; noise-injecting runs and bad times are refused.
    samplers.sample(model, noise, method="dpmpp_2m", t_final=0.0, **kw)
    with pytest.raises(ValueError, match="method 'ddpm'.*injects noise"):
        samplers.sample(model, noise, method="ddpm", t_final=0.0, key=key, **kw)
    with pytest.raises(ValueError, match="eta=0.5 injects noise"):
        samplers.sample(model, noise, method="ddim", eta=0.5, t_final=0.0, key=key, **kw)
    with pytest.raises(ValueError, match=r"t_final=20.0 must lie in \[t_min, t_last\)"):
        samplers.sample(model, noise, method="ddim", t_final=20.0, **kw)


# ----------------------------------------------------------------------------- export

SD_HP = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PIXEL_HP = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
COSINE_HP = dict(beta_schedule="cosine")
ZSNR_HP = dict(SD_HP, zero_terminal_snr=True)


@pytest.mark.parametrize(
    "hp, prediction, method, placement, clip, t_final",
    [
        (SD_HP, "epsilon", "ddim", "leading_sd", False, 0.0),
        (ZSNR_HP, "v", "ddim", "trailing", False, None),
        (PIXEL_HP, "epsilon", "ddim", "leading", True, None),
        (PIXEL_HP, "epsilon", "ddpm", None, True, None),
        (COSINE_HP, "x0", "ddpm", "linspace", False, None),
        (PIXEL_HP, "epsilon", "euler", "leading", False, None),
        (SD_HP, "v", "euler", "karras", False, None),
        (SD_HP, "epsilon", "dpmpp_2m", "trailing", False, None),
        (PIXEL_HP, "v", "dpmpp_2m", "trailing", False, 0.0),
        (SD_HP, "epsilon", "unipc", "trailing", False, None),
        (PIXEL_HP, "v", "unipc", "trailing", False, None),
    ],
)
def test_export_round_trip(hp, prediction, method, placement, clip, t_final):
    sch = schedules.make_schedule("discrete_vp", **hp)
    cfg = S.scheduler_config_for(
        sch.hparams, prediction, method, placement, clip_x0=clip, t_final=t_final
    )
    cfg = json.loads(json.dumps(cfg))  # what scheduler_config.json holds
    assert cfg["_class_name"] in S.SUPPORTED
    spec = S.scheduler_from_config(cfg, use_clipped_model_output=clip)
    assert spec.schedule_kwargs == sch.hparams
    assert (spec.prediction, spec.method, spec.clip_x0, spec.t_final) == (
        prediction,
        method,
        clip,
        t_final,
    )
    assert spec.differences == ()
    own = placement or samplers.default_placement(method, sch)
    for n in (4, 10, 20, 50):
        want = samplers.step_times(sch, n, own)
        if own == "karras":  # diffusers' float32 sigma table vs diffjax's float32 log-SNR
            np.testing.assert_allclose(spec.placement(n), want, rtol=0, atol=0.05)
        else:
            np.testing.assert_array_equal(spec.placement(n), want)


@pytest.mark.parametrize(
    "args, kwargs, pattern",
    [
        ((schedules.make_schedule("flow"), "flow", "flow_euler"), {}, "schedule 'flow'"),
        (({"name": "continuous_vp", "beta_min": 0.1}, "epsilon", "ddim"), {}, "not a discrete"),
        ((SD_HP, "flow", "ddim"), {}, "prediction='flow'"),
        ((SD_HP, "epsilon", "heun"), {}, "method 'heun' has no diffusers"),
        ((SD_HP, "epsilon", "dpmpp_3m"), {}, "published"),
        ((SD_HP, "epsilon", "dpmpp_2m"), {}, "placement 'logsnr' with dpmpp_2m"),
        ((SD_HP, "epsilon", "unipc"), {}, "placement 'logsnr' with unipc"),
        ((SD_HP, "epsilon", "unipc", "trailing"), {"t_final": 0.0}, "t_final with unipc"),
        ((SD_HP, "epsilon", "ddim", "linspace"), {}, "placement 'linspace' with ddim"),
        ((SD_HP, "epsilon", "ddim", [900.0, 500.0]), {}, "explicit placement"),
        ((ZSNR_HP, "v", "euler", "trailing"), {}, "2\\*\\*-24"),
        ((SD_HP, "epsilon", "euler", "leading"), {"clip_x0": True}, "does not clip"),
        ((SD_HP, "epsilon", "ddim", "leading"), {"t_final": 5.0}, "t_final=5.0"),
        ((ZSNR_HP, "epsilon", "ddim", "trailing"), {}, "divides by alpha_bar = 0"),
    ],
)
def test_export_refusals(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        S.scheduler_config_for(*args, **kwargs)
