"""UniPC (`unipc`): order, the SNR-0 limit, against DPM-Solver++(2M), and diffusers' loop.

Exact answers come from `analytic.GaussianData` (closed-form denoiser and probability-flow
map). The parity fixture (tests/fixtures/unipc/reference.npz, made by
tests/fixtures/unipc/make_unipc.py) holds diffusers' UniPCMultistepScheduler loop
(bh2, predict_x0, lower_order_final) on the same kind of exact denoiser.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.diffusion import analytic, methods, samplers, schedules
from diffjax.diffusion.placements import np_eval

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "unipc", "reference.npz")


def _gauss(dim=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return analytic.GaussianData(rng.normal(size=dim) * 0.5, a @ a.T / dim + 0.05 * np.eye(dim))


def _alpha_sigma(sch, t):
    a, s = np_eval(sch.alpha_sigma, t)  # as the sampler evaluates its grid
    return float(a), float(s)


def _exact(data, sch, ts, noise, t_end=None):
    """Exact ODE from sigma(t_0) * noise at t_0 to t_{K-1}, then the exact x0 there
    (or, with `t_end="clean"`, the exact flow map to the data)."""
    src = _alpha_sigma(sch, ts[0])
    start = src[1] * noise
    if t_end == "clean":
        return data.flow(start, src, (1.0, 0.0))
    a1, s1 = _alpha_sigma(sch, ts[-1])
    return data.x0_eps(data.flow(start, src, (a1, s1)), a1, s1)[0]


# ----------------------------------------------------------------------------- order

ORDER_CASES = [
    # (schedule, prediction, placement): flow starts at SNR 0 (an infinite first step).
    ("discrete_vp", "epsilon", "logsnr"),
    ("continuous_vp", "v", "logsnr"),
    ("edm", "x0", "karras"),
    ("flow", "flow", "uniform"),
]


@pytest.mark.parametrize("sched,pred,placement", ORDER_CASES)
def test_unipc_converges_at_third_order(sched, pred, placement):
    data = _gauss()
    sch = schedules.make_schedule(sched)
    steps = (24, 48, 96)
    with jax.enable_x64(True):
        noise = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)
        grids = [np.linspace(1.0, 0.05, n) if placement == "uniform" else placement for n in steps]

        @jax.jit
        def run_all(noise):
            return [
                samplers.sample(
                    data.model_fn(sch, pred),
                    noise,
                    schedule=sch,
                    method="unipc",
                    num_steps=n,
                    prediction=pred,
                    placement=pl,
                )
                for n, pl in zip(steps, grids, strict=True)
            ]

        errs = []
        for n, pl, out in zip(steps, grids, run_all(noise), strict=True):
            assert out.dtype == jnp.float64
            ts = samplers.step_times(sch, n, pl)
            errs.append(float(jnp.max(jnp.abs(out - _exact(data, sch, ts, noise)))))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - 3.0) < 0.3, (errs, slope)


def test_unipc_record():
    m = samplers.METHODS["unipc"]
    assert m.order == 3 and m.history == 2 and m.correction is None and not m.stochastic
    assert samplers.nfe("unipc", 10) == 10


# ----------------------------------------------------------------------------- coefficients


def _transitions(lam: np.ndarray) -> methods.Transitions:
    """The VP grid (alpha^2 = sigmoid(2 lambda)) through the half log-SNRs `lam`."""
    with np.errstate(over="ignore"):
        a = np.sqrt(1.0 / (1.0 + np.exp(-2.0 * lam)))
        s = np.sqrt(1.0 / (1.0 + np.exp(2.0 * lam)))
    return methods.Transitions(
        a_s=a[:-1], s_s=s[:-1], lam_s=lam[:-1], a_d=a[1:], s_d=s[1:], lam_d=lam[1:], h=np.diff(lam)
    )


def test_coefficients_are_exact_for_constant_x0_and_continuous_at_snr0():
    lam = np.array([-np.inf, -2.0, -1.2, -0.1, 0.7, 2.0, 3.1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c = methods.METHODS["unipc"].coefficients(_transitions(lam), 0.0)
    g = _transitions(lam)
    for v in c.values():
        assert np.all(np.isfinite(v))
    # x0 constant: every correction vanishes and the step is exact (the DDIM step).
    np.testing.assert_allclose(c["c0"] + c["c1"] + c["c2"], g.a_d * -np.expm1(-g.h), rtol=1e-12)
    np.testing.assert_allclose(c["cx"], g.s_d / g.s_s, rtol=1e-12)
    # The SNR-0 coefficients are the limit of those from a very noisy finite start
    # (which differ by O(1/h_0) = 1e-7).
    far = lam.copy()
    far[0] = -1e7
    c_far = methods.METHODS["unipc"].coefficients(_transitions(far), 0.0)
    for k in c:
        np.testing.assert_allclose(c[k], c_far[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # From SNR 0 the first step is the exact limit of the first-order step: x0_0 alpha_1.
    assert c["cx"][0] == pytest.approx(g.s_d[0]) and c["c0"][0] == pytest.approx(g.a_d[0])
    # Finite grid: the predictor alone is DPM-Solver++(2M); the difference is the folded
    # corrector, which starts at the second step and uses x0 two points back from the
    # third on (UniC-1 after the first-order first step).
    fin = _transitions(lam[1:])
    cu = methods.METHODS["unipc"].coefficients(fin, 0.0)
    c2m = methods.METHODS["dpmpp_2m"].coefficients(fin, 0.0)
    np.testing.assert_allclose(cu["c0"][0], c2m["c0"][0], rtol=1e-14)
    assert np.all(np.abs(cu["c0"][1:] - c2m["c0"][1:]) > 1e-4)
    assert cu["c2"][1] == 0.0 and np.all(cu["c2"][2:] != 0.0)


# ----------------------------------------------------------------------------- zero SNR


def test_zero_terminal_snr_is_finite_and_right():
    data = _gauss(dim=2)
    noise = jax.random.normal(jax.random.key(0), (256, 2))
    z = schedules.discrete_vp(zero_terminal_snr=True)
    ts = samplers.step_times(z, 12, "trailing")
    assert _alpha_sigma(z, ts[0])[0] == 0.0

    @jax.jit
    def run_all(noise):
        return {
            (m, p): samplers.sample(
                data.model_fn(z, p),
                noise,
                schedule=z,
                method=m,
                num_steps=12,
                prediction=p,
                placement="trailing",
            )
            for m in ("unipc", "dpmpp_2m")
            for p in ("epsilon", "v")
        }

    out = run_all(noise)
    for v in out.values():
        assert np.all(np.isfinite(v))
    # The epsilon network is asked where it identifies x0; it then agrees with the v one.
    assert float(jnp.max(jnp.abs(out["unipc", "epsilon"] - out["unipc", "v"]))) < 0.02
    exact = _exact(data, z, ts, noise)
    err = {k: float(jnp.max(jnp.abs(v - exact))) for k, v in out.items()}
    assert err["unipc", "v"] < 0.02, err
    assert err["unipc", "v"] < err["dpmpp_2m", "v"], err


# ----------------------------------------------------------------------------- vs DPM-Solver++(2M)

# The set-ups of benchmarks/samplers.py: (schedule, kwargs, prediction).
SETUPS = {
    "discrete_vp": ("discrete_vp", {}, "epsilon"),
    "discrete_vp_sd": (
        "discrete_vp",
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        "epsilon",
    ),
    "continuous_vp": ("continuous_vp", {}, "epsilon"),
    "edm": ("edm", {}, "x0"),
    "flow": ("flow", {}, "flow"),
}
# (set-up, steps, placement): None is each method's default.
RUNS = [
    ("discrete_vp", 5, None),
    ("discrete_vp", 10, None),
    ("discrete_vp", 20, None),
    ("discrete_vp_sd", 10, None),
    ("flow", 10, "trailing"),
]


def _bench_gauss():
    """The 8-d Gaussian of benchmarks/samplers.py (eigenvalues 0.01 to 2)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    evals = np.logspace(-2, np.log10(2.0), 8)
    return analytic.GaussianData(rng.normal(size=8) * 0.5, (q * evals) @ q.T)


def distances(runs, methods_=("unipc", "dpmpp_2m")) -> dict[tuple, tuple[float, float]]:
    """(set-up, steps, placement, method) -> (squared Fréchet distance of the output law
    to the data law, max error vs the exact probability-flow map of 512 noises).

    The samplers are affine maps of the noise, so the output law is exact: the mean is the
    image of 0 and the covariance `L L^T` with `L` the images of the basis vectors.
    """
    data = _bench_gauss()
    noise = jax.random.normal(jax.random.key(0), (512, 8))
    x = jnp.concatenate([jnp.zeros((1, 8)), jnp.eye(8), noise])
    cases, grids = [], []
    for setup, n, placement in runs:
        name, kw, pred = SETUPS[setup]
        sch = schedules.make_schedule(name, **kw)
        for m in methods_:
            ts = samplers.step_times(sch, n, placement or samplers.default_placement(m, sch))
            cases.append((setup, n, placement, m))
            grids.append((sch, pred, ts))

    @jax.jit
    def run_all(x):
        return [
            samplers.sample(
                data.model_fn(sch, pred),
                x,
                schedule=sch,
                method=case[3],
                num_steps=case[1],
                prediction=pred,
                placement=ts,
            )
            for case, (sch, pred, ts) in zip(cases, grids, strict=True)
        ]

    res = {}
    for case, (sch, _, ts), out in zip(cases, grids, run_all(x), strict=True):
        out = np.asarray(out, np.float64)
        shift, lin = out[0], (out[1:9] - out[0]).T
        fd = analytic.frechet_distance(shift, lin @ lin.T, data.mean, data.cov)
        exact = np.asarray(_exact(data, sch, ts, noise, "clean"), np.float64)
        res[case] = (fd, float(np.max(np.abs(out[9:] - exact))))
    return res


@pytest.fixture(scope="module")
def bench():
    return distances(RUNS)


@pytest.mark.parametrize("setup,placement", [("discrete_vp_sd", None), ("flow", "trailing")])
def test_unipc_at_10_steps_is_as_close_as_dpmpp_2m(bench, setup, placement):
    # The issue's acceptance criterion where it holds (docs/samplers.md has all set-ups):
    # SD's betas at the defaults (logsnr for both), flow with trailing steps for both.
    u, d = bench[setup, 10, placement, "unipc"], bench[setup, 10, placement, "dpmpp_2m"]
    assert u[0] <= d[0] and u[1] <= d[1], (u, d)


@pytest.mark.xfail(
    strict=True,
    reason="measured: at 10 logsnr steps on linear betas UniPC (bh2, diffusers' own "
    "algorithm, see the parity test) is 1.9x farther than DPM-Solver++(2M) (FD 9.7e-3 vs "
    "5.1e-3); it is closer at 5 and 20 steps",
)
def test_issue_criterion_at_10_steps_on_linear_betas(bench):
    u, d = bench["discrete_vp", 10, None, "unipc"], bench["discrete_vp", 10, None, "dpmpp_2m"]
    assert u[0] <= d[0], (u, d)


def test_unipc_is_closer_than_dpmpp_2m_at_5_and_20_steps(bench):
    for n in (5, 20):
        u, d = bench["discrete_vp", n, None, "unipc"], bench["discrete_vp", n, None, "dpmpp_2m"]
        assert u[0] < d[0] and u[1] < d[1], (n, u, d)


# ----------------------------------------------------------------------------- diffusers


def _fixture():
    if not os.path.exists(FIXTURE):
        pytest.skip("no fixture: run tests/fixtures/unipc/make_unipc.py")
    with np.load(FIXTURE) as z:
        return dict(z)


PRED = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def _case(ref: dict, case: str) -> tuple[schedules.Schedule, str]:
    cfg = json.loads(str(ref[f"{case}_config"]))
    assert cfg["solver_order"] == 2 and cfg["solver_type"] == "bh2"
    assert cfg["predict_x0"] and cfg["lower_order_final"] and cfg["final_sigmas_type"] == "zero"
    sch = schedules.discrete_vp(
        beta_schedule=cfg["beta_schedule"], beta_start=cfg["beta_start"], beta_end=cfg["beta_end"]
    )
    return sch, PRED[cfg["prediction_type"]]


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_matches_diffusers_unipc_step_for_step():
    ref = _fixture()
    data = analytic.GaussianData(ref["mean"], ref["cov"])
    cases = sorted({k.split("_n")[0] for k in ref if k.endswith("_traj")})
    assert cases == ["leading_x0", "linspace_eps", "trailing_v"]
    with jax.enable_x64(True):
        for case in cases:
            sch, pred = _case(ref, case)
            for n in ref[f"{case}_steps"]:
                p = f"{case}_n{n}_"
                ts, want = ref[p + "timesteps"], ref[p + "traj"]
                # The float64 grid diffusers ran on is this schedule's (whose log-SNR
                # table is float32), and diffusers' own float32 one agrees as closely.
                a, s = np_eval(sch.alpha_sigma, ts)
                np.testing.assert_allclose(s / a, ref[p + "sigmas"][:-1], rtol=5e-7)
                np.testing.assert_allclose(ref[p + "sigmas_f32"], ref[p + "sigmas"], rtol=2e-6)
                # diffusers starts at the noise itself (init_noise_sigma = 1), diffjax at
                # sigma(t_0) times its noise argument.
                _, traj = samplers.sample(
                    data.model_fn(sch, pred),
                    jnp.asarray(ref["noise"] / s[0]),
                    schedule=sch,
                    method="unipc",
                    num_steps=int(n),
                    prediction=pred,
                    placement=ts,
                    return_trajectory=True,
                )
                err = _rel_err(traj, want)
                assert err < 1e-7, (case, n, err)  # measured: 3e-9 to 8e-9


def test_matches_diffusers_unipc_in_float32():
    ref = _fixture()
    data = analytic.GaussianData(ref["mean"], ref["cov"])
    sch, pred = _case(ref, "linspace_eps")
    ts = ref["linspace_eps_n10_timesteps"]
    s0 = float(np_eval(sch.alpha_sigma, ts[0])[1])
    run = functools.partial(
        samplers.sample,
        data.model_fn(sch, pred),
        schedule=sch,
        method="unipc",
        num_steps=10,
        prediction=pred,
        placement=ts,
    )
    out = jax.jit(run)(jnp.asarray(ref["noise"] / s0, jnp.float32))
    assert out.dtype == jnp.float32
    assert _rel_err(out, ref["linspace_eps_n10_traj"][-1]) < 1e-5
