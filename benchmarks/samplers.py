"""Sampler quality per network evaluation on problems with exact denoisers.

For every sampler in `diffjax.diffusion.samplers.METHODS` (at its default placement)
this measures the squared Fréchet distance between the law of its samples and the
data law, at 5/10/20/50 network evaluations (NFE), on

* `gauss`: an 8-d Gaussian with eigenvalues from 0.01 to 2 (exact denoiser). For
  deterministic samplers the sampler is an affine map of the noise, so the output law
  is computed exactly by pushing the mean and the basis vectors through it;
  stochastic samplers use Monte-Carlo moments of 50 000 samples.
* `mixture`: a 2-d mixture of 8 Gaussians (std 0.1) on a circle of radius 1, with
  unequal weights (exact, non-linear denoiser); Monte-Carlo moments of 50 000
  samples (the same noise for every sampler).

on five schedule/prediction set-ups: `discrete_vp` (DDPM's linear betas, epsilon),
`discrete_vp_sd` (Stable Diffusion's scaled-linear betas 0.00085..0.012, epsilon),
`continuous_vp` (epsilon), `edm` (x0 of the preconditioned denoiser) and `flow`
(velocity).

With `--study` it also measures, on `gauss` at 5/10/20/50 steps, every placement of
ours (`samplers.PLACEMENTS`) against every step placement diffusers offers for the
same method (`DIFFUSERS`, below), and picks each method's default per schedule kind
(`samplers.Placements`: discrete, continuous, edm, flow) with `choose`: the placement
of ours that is at least as close to the data law as diffusers' best one at every step
count on every set-up of that kind, the best overall (mean log-FD) among those. That is
how `Method.placements` were chosen. The tables replace the marked sections of
docs/samplers.md (`--write`).

Run (CPU; about 8 min on 2 busy cores):
  .venv/bin/python benchmarks/samplers.py --study --write
`--results FILE.json` keeps the raw study numbers and reuses the ones already there.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import analytic, samplers, schedules

NFES = (5, 10, 20, 50)
STUDY_STEPS = (5, 10, 20, 50)
NUM_MC = 50_000
STUDY_MC = 200_000  # the study compares placements of stochastic methods within ~1%
MC_TOL = 0.02  # ... so there, a placement counts as "as close" up to this excess
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SETUPS = {
    "discrete_vp": ("discrete_vp", {}, "epsilon"),
    "discrete_vp_sd": ("discrete_vp", SD_BETAS, "epsilon"),
    "continuous_vp": ("continuous_vp", {}, "epsilon"),
    "edm": ("edm", {}, "x0"),
    "flow": ("flow", {}, "flow"),
}
# Set-ups that share one default: the fields of `samplers.Placements`.
FAMILIES = {
    "discrete": ("discrete_vp", "discrete_vp_sd"),
    "continuous": ("continuous_vp",),
    "edm": ("edm",),
    "flow": ("flow",),
}
# diffusers' placements, written from its schedulers' `set_timesteps`:
# * discrete schedules: its `timestep_spacing` over the 1000 training steps, `leading`
#   (with Stable Diffusion's `steps_offset=1`), `trailing` and `linspace`;
# * continuous VP and flow: `linspace`, uniform in t from t_max to 1/1000 of the range
#   (ScoreSdeVpScheduler's `linspace(1, 1e-3, S)`, FlowMatchEulerDiscreteScheduler's
#   sigmas `linspace(1, 1/1000, S)`);
# * EDM (EDMEulerScheduler, EDMDPMSolverMultistepScheduler): `karras` and `exponential`
#   (uniform in log sigma) between sigma_min and sigma_max;
# * and `karras` (`use_karras_sigmas`, rho 7) wherever the method's diffusers scheduler
#   offers it (Euler, Heun, DPM-Solver++ and its SDE variant), between the schedule's
#   extreme sigmas (FlowMatch: its own sigma, t, from 1/1000 to 1).
DIFFUSERS = ("leading", "trailing", "linspace", "karras", "exponential")
KARRAS_IN_DIFFUSERS = frozenset({"euler", "heun", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"})
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "samplers.md"


def problems() -> dict[str, analytic.GaussianData | analytic.MixtureData]:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    evals = np.logspace(-2, np.log10(2.0), 8)
    gauss = analytic.GaussianData(rng.normal(size=8) * 0.5, (q * evals) @ q.T)
    angles = 2 * np.pi * np.arange(8) / 8
    means = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    weights = np.arange(1, 9, dtype=np.float64)
    mixture = analytic.MixtureData(weights / weights.sum(), means, np.full(8, 0.1))
    return {"gauss": gauss, "mixture": mixture}


@functools.cache
def schedule(setup: str) -> schedules.Schedule:
    name, kwargs, _ = SETUPS[setup]
    return schedules.make_schedule(name, **kwargs)


def steps_for(method: str, nfe: int) -> int:
    per = samplers.METHODS[method].evals_per_step
    return nfe if per == 1 else (nfe + 1) // 2


def frechet_many(
    data, setup: str, method: str, runs: list[tuple[int, object]], num_mc: int = NUM_MC
) -> list[float]:
    """Squared FD to the data law of `method` for each `(num_steps, placement)` run.

    All runs share one compiled program, the noise and the key.
    """
    sch, pred = schedule(setup), SETUPS[setup][2]
    model_fn = data.model_fn(sch, pred)

    @jax.jit
    def run_all(x: jax.Array, key: jax.Array) -> list[jax.Array]:
        return [
            samplers.sample(
                model_fn,
                x,
                schedule=sch,
                method=method,
                num_steps=num_steps,
                prediction=pred,
                placement=placement,
                key=key,
            )
            for num_steps, placement in runs
        ]

    mu, cov = data.moments()
    dim = mu.size
    if isinstance(data, analytic.GaussianData) and not samplers.METHODS[method].stochastic:
        basis = jnp.concatenate([jnp.zeros((1, dim)), jnp.eye(dim)], axis=0)
        fds = []
        for out in run_all(basis, jax.random.key(1)):
            out = np.asarray(out, np.float64)
            shift, lin = out[0], (out[1:] - out[0]).T
            fds.append(analytic.frechet_distance(shift, lin @ lin.T, mu, cov))
        return fds
    noise = jax.random.normal(jax.random.key(0), (num_mc, dim))
    fds = []
    for out in run_all(noise, jax.random.key(1)):
        out = np.asarray(out, np.float64)
        fds.append(analytic.frechet_distance(out.mean(0), np.cov(out.T), mu, cov))
    return fds


def fmt(v: float) -> str:
    return f"{v:.1e}" if np.isfinite(v) else "nan"


def main_table(probs) -> str:
    lines = []
    for setup in SETUPS:
        lines.append(f"\n**{setup}** (prediction `{SETUPS[setup][2]}`)\n")
        head = "| method | placement | " + " | ".join(f"{p} @{n}" for p in probs for n in NFES)
        lines.append(head + " |")
        lines.append("|" + "---|" * (2 + len(probs) * len(NFES)))
        for method in samplers.METHODS:
            row = [f"`{method}`", samplers.default_placement(method, schedule(setup))]
            runs = [(steps_for(method, n), None) for n in NFES]
            for data in probs.values():
                row.extend(fmt(v) for v in frechet_many(data, setup, method, runs))
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    lines.append("\nNFE: Heun-type methods use `(NFE+1)//2` steps, i.e. 5, 9, 19, 49 evaluations.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- placement study


def diffusers_times(spacing: str, sch: schedules.Schedule, num_steps: int) -> np.ndarray:
    """diffusers' step times for `spacing` (see `DIFFUSERS`), in `sch`'s time convention."""
    n_train, s = 1000, num_steps
    if spacing in ("karras", "exponential"):
        if sch.is_discrete:
            abar = schedules.discrete_alphas_cumprod(sch)
            table = np.sqrt((1.0 - abar) / abar)  # diffusers' sigma, increasing in t
            lo, hi = table[0], table[-1]
        elif sch.name == "flow":
            lo, hi = 1.0 / n_train, 1.0  # FlowMatch: its sigma is t
        else:
            lo, hi = (math.exp(-0.5 * v) for v in sch.logsnr_range[::-1])
        if spacing == "karras":
            ramp = np.linspace(0.0, 1.0, s)
            sig = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        else:
            sig = np.exp(np.linspace(math.log(hi), math.log(lo), s))
        if sch.is_discrete:  # log-sigma interpolation over the timestep table
            return np.interp(np.log(sig), np.log(table), np.arange(n_train, dtype=np.float64))
        if sch.name == "flow":
            return sig
        lam = (-2.0 * np.log(sig)).astype(np.float32)
        return np.asarray(sch.t_from_logsnr(jnp.asarray(lam)), np.float64)
    if not sch.is_discrete:
        if spacing != "linspace":
            raise ValueError(f"diffusers has no {spacing!r} placement for {sch.name}")
        return np.linspace(sch.t_max, sch.t_clean + (sch.t_max - sch.t_clean) / n_train, s)
    if spacing == "leading":
        return (np.arange(s) * (n_train // s))[::-1] + 1.0  # steps_offset = 1 (SD)
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / s)) - 1.0
    if spacing == "linspace":
        return np.round(np.linspace(0, n_train - 1, s))[::-1]
    raise ValueError(spacing)


def diffusers_spacings(setup: str, method: str) -> tuple[str, ...]:
    sch = schedule(setup)
    if sch.name == "edm":
        return ("karras", "exponential")
    out = ("leading", "trailing", "linspace") if sch.is_discrete else ("linspace",)
    return out + (("karras",) if method in KARRAS_IN_DIFFUSERS else ())


def candidates(setup: str, method: str, num_steps: int) -> dict[str, np.ndarray | None]:
    """`ours:<placement>` and `diffusers:<spacing>` -> times (None: not defined there)."""
    sch = schedule(setup)
    out: dict[str, np.ndarray | None] = {}
    for pl in samplers.PLACEMENTS:
        try:
            out[f"ours:{pl}"] = samplers.step_times(sch, num_steps, pl)
        except ValueError:
            out[f"ours:{pl}"] = None
    for sp in diffusers_spacings(setup, method):
        out[f"diffusers:{sp}"] = diffusers_times(sp, sch, num_steps)
    return out


def _key(setup: str, method: str, num_steps: int, ts: np.ndarray) -> str:
    digest = hashlib.sha1(np.asarray(ts, np.float64).tobytes()).hexdigest()[:16]
    mc = f"|mc{STUDY_MC}" if samplers.METHODS[method].stochastic else ""
    return f"{setup}|{method}|{num_steps}|{digest}{mc}"


def study(gauss: analytic.GaussianData, cache: dict[str, float], save=None) -> dict:
    """FD of every candidate: {setup: {method: {steps: {label: fd}}}} (nan: undefined).

    `cache` maps `_key(...)` to FD and is filled in; `save()` is called after each method.
    """
    res: dict = {}
    for setup in SETUPS:
        for method in samplers.METHODS:
            if save is not None:
                save()
            for n in STUDY_STEPS:
                cands = candidates(setup, method, n)
                todo = {}
                for ts in cands.values():
                    if ts is not None and _key(setup, method, n, ts) not in cache:
                        todo[_key(setup, method, n, ts)] = ts
                if todo:
                    runs = [(n, ts) for ts in todo.values()]
                    fds = frechet_many(gauss, setup, method, runs, STUDY_MC)
                    cache.update(zip(todo, fds, strict=True))
                row = {
                    lab: (math.nan if ts is None else cache[_key(setup, method, n, ts)])
                    for lab, ts in cands.items()
                }
                res.setdefault(setup, {}).setdefault(method, {})[n] = row
                best = min(row, key=lambda k: row[k] if np.isfinite(row[k]) else np.inf)
                print(f"{setup:15s} {method:13s} {n:3d} best {best}", flush=True)
    return res


def tolerance(method: str) -> float:
    """Largest ratio to diffusers' best that counts as "at least as close"."""
    return 1.0 + (MC_TOL if samplers.METHODS[method].stochastic else 0.0)


def choose(res: dict, method: str, family: str) -> tuple[str, float]:
    """The default for `method` on `family`, and its worst ratio to diffusers' best.

    The ratio is our FD over the best of diffusers' FDs, for one set-up and step count.
    A placement qualifies when it is <= 1 (stochastic methods: <= 1 + MC_TOL) for every
    set-up of the family and every step count. The pick is the qualifying placement
    with the lowest mean log-FD; when none qualifies, the one whose worst ratio is
    lowest.
    """
    setups = FAMILIES[family]
    cells = [(s, n) for s in setups for n in STUDY_STEPS]
    theirs = np.array(
        [
            min(v for k, v in res[s][method][n].items() if k.startswith("diffusers:"))
            for s, n in cells
        ]
    )
    ours = [k for k in res[setups[0]][method][STUDY_STEPS[0]] if k.startswith("ours:")]
    vals = {k: np.array([res[s][method][n][k] for s, n in cells]) for k in ours}
    ours = [k for k in ours if np.all(np.isfinite(vals[k]))]
    worst = {k: float(np.max(vals[k] / theirs)) for k in ours}
    ok = [k for k in ours if worst[k] <= tolerance(method)]
    if ok:
        pick = min(ok, key=lambda k: float(np.mean(np.log(vals[k]))))
    else:
        pick = min(ours, key=worst.get)
    return pick.split(":", 1)[1], worst[pick]


def study_tables(res: dict) -> str:
    lines = [
        "\n**Picks** (`choose`) per schedule kind, and the pick's FD divided by the best of "
        f"diffusers' at {' / '.join(map(str, STUDY_STEPS))} steps, per set-up (<= 1: at "
        "least as close)\n",
        "| method | kind | pick | " + " | ".join(SETUPS) + " |",
        "|" + "---|" * (3 + len(SETUPS)),
    ]
    for method in samplers.METHODS:
        for family, setups in FAMILIES.items():
            pick, worst = choose(res, method, family)
            cells = []
            for s in SETUPS:
                if s not in setups:
                    cells.append("")
                    continue
                r = []
                for n in STUDY_STEPS:
                    row = res[s][method][n]
                    best = min(v for k, v in row.items() if k.startswith("diffusers:"))
                    r.append(f"{row['ours:' + pick] / best:.2f}")
                cells.append(" / ".join(r))
            flag = "" if worst <= tolerance(method) else f" (none qualifies; worst {worst:.2f})"
            current = getattr(samplers.METHODS[method].placements, family)
            if current != pick:
                flag += f" (the default is {current})"
            lines.append(f"| `{method}` | {family} | {pick}{flag} | " + " | ".join(cells) + " |")
    for setup in SETUPS:
        shown = list(dict.fromkeys(k for m in res[setup] for k in res[setup][m][STUDY_STEPS[0]]))
        shown = [
            k
            for k in shown
            if any(
                np.isfinite(res[setup][m][n].get(k, np.nan))
                for m in res[setup]
                for n in STUDY_STEPS
            )
        ]

        # A placement of ours that gives the same numbers as an earlier one here (e.g.
        # linspace_eps = linspace off flow) is shown once.
        def column(lab: str, setup: str = setup) -> list[float]:
            return [res[setup][m][n].get(lab, math.nan) for m in res[setup] for n in STUDY_STEPS]

        same = {}
        for i, lab in enumerate(shown):
            for prev in shown[:i]:
                if lab.startswith("ours:") and prev.startswith("ours:") and prev not in same:
                    if np.array_equal(column(lab), column(prev), equal_nan=True):
                        same[lab] = prev
                        break
        shown = [lab for lab in shown if lab not in same]
        aliases = "".join(f"; {k.split(':')[1]} = {v.split(':')[1]} here" for k, v in same.items())
        lines.append(
            f"\n**{setup}**: FD at {' / '.join(map(str, STUDY_STEPS))} steps; bold: the "
            f"best of ours and of diffusers' (mean log-FD), italic: the default{aliases}\n"
        )
        head = [lab.replace("ours:", "").replace("diffusers:", "diffusers ") for lab in shown]
        lines.append("| method | " + " | ".join(head) + " |")
        lines.append("|" + "---|" * (1 + len(shown)))
        for method in samplers.METHODS:
            rows = res[setup][method]
            mean = {}
            for lab in rows[STUDY_STEPS[0]]:
                v = np.array([rows[n][lab] for n in STUDY_STEPS])
                mean[lab] = np.mean(np.log(v)) if np.all(np.isfinite(v)) else np.inf
            best = {
                side: min((k for k in mean if k.startswith(side)), key=mean.get)
                for side in ("ours:", "diffusers:")
            }
            default = "ours:" + samplers.default_placement(method, schedule(setup))
            cells = []
            for lab in shown:
                if lab not in rows[STUDY_STEPS[0]]:
                    cells.append("")
                    continue
                cell = " / ".join(fmt(rows[n][lab]) for n in STUDY_STEPS)
                cell = f"*{cell}*" if lab == default else cell
                cells.append(f"**{cell}**" if lab in best.values() else cell)
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name} START -->", f"<!-- {name} END -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no '{start}' ... '{end}' section")
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", action="store_true", help="also compare placements")
    parser.add_argument("--write", action="store_true", help="update docs/samplers.md")
    parser.add_argument("--no-main", action="store_true", help="skip the main table")
    parser.add_argument("--results", type=pathlib.Path, help="study numbers (JSON, reused)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    probs = problems()
    table = None if args.no_main else main_table(probs)
    study_md = None
    if args.study:
        path = args.results
        cache = json.loads(path.read_text()) if path and path.exists() else {}

        def save() -> None:
            if path:
                path.write_text(json.dumps(cache, indent=0, sort_keys=True))

        res = study(probs["gauss"], cache, save)
        save()
        study_md = study_tables(res)
        print(study_md)
    print(f"done in {time.perf_counter() - t0:.0f} s on {jax.devices()[0].platform}")
    if args.write:
        text = DOC.read_text()
        if table is not None:
            text = replace_section(text, "SAMPLER TABLE", table)
        if study_md is not None:
            text = replace_section(text, "PLACEMENT STUDY", study_md)
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
