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

on three schedule/prediction set-ups: `discrete_vp` (linear betas, epsilon),
`edm` (x0 of the preconditioned denoiser) and `flow` (velocity). With `--study`
it also compares every placement per method at 10 and 20 NFE (how the defaults were
chosen). The tables replace the marked sections of docs/samplers.md (`--write`).

Run (CPU, a few minutes):  .venv/bin/python benchmarks/samplers.py --study --write
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.diffusion import analytic, samplers, schedules

NFES = (5, 10, 20, 50)
STUDY_NFES = (10, 20)
NUM_MC = 50_000
SETUPS = {
    "discrete_vp": ("discrete_vp", {}, "epsilon"),
    "edm": ("edm", {}, "x0"),
    "flow": ("flow", {}, "flow"),
}
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


def steps_for(method: str, nfe: int) -> int:
    per = samplers.METHODS[method].evals_per_step
    return nfe if per == 1 else (nfe + 1) // 2


def frechet(data, setup: str, method: str, nfe: int, placement=None, **kw) -> float:
    name, skw, pred = SETUPS[setup]
    sch = schedules.make_schedule(name, **skw)
    model_fn = data.model_fn(sch, pred)
    fn = jax.jit(
        functools.partial(
            samplers.sample,
            model_fn,
            schedule=sch,
            method=method,
            num_steps=steps_for(method, nfe),
            prediction=pred,
            placement=placement,
            **kw,
        )
    )
    mu, cov = data.moments()
    dim = mu.size
    if isinstance(data, analytic.GaussianData) and not samplers.METHODS[method].stochastic:
        basis = jnp.concatenate([jnp.zeros((1, dim)), jnp.eye(dim)], axis=0)
        out = np.asarray(fn(basis), np.float64)
        shift, lin = out[0], (out[1:] - out[0]).T
        return analytic.frechet_distance(shift, lin @ lin.T, mu, cov)
    noise = jax.random.normal(jax.random.key(0), (NUM_MC, dim))
    out = np.asarray(fn(noise, key=jax.random.key(1)), np.float64)
    return analytic.frechet_distance(out.mean(0), np.cov(out.T), mu, cov)


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
            sch = schedules.make_schedule(SETUPS[setup][0])
            placement = samplers.default_placement(method, sch)
            row = [f"`{method}`", placement]
            for data in probs.values():
                for n in NFES:
                    row.append(fmt(frechet(data, setup, method, n)))
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    lines.append("\nNFE: Heun-type methods use `(NFE+1)//2` steps, i.e. 5, 9, 19, 49 evaluations.")
    return "\n".join(lines) + "\n"


def study_table(probs) -> str:
    lines = []
    for setup in SETUPS:
        sch = schedules.make_schedule(SETUPS[setup][0])
        places = [p for p in samplers.PLACEMENTS if p != "leading" or sch.is_discrete]
        lines.append(f"\n**{setup}**: FD at 10 / 20 NFE, gauss ; mixture (best in bold)\n")
        lines.append("| method | " + " | ".join(places) + " |")
        lines.append("|" + "---|" * (1 + len(places)))
        for method in samplers.METHODS:
            scores = {}
            for pl in places:
                vals = []
                for data in probs.values():
                    for n in STUDY_NFES:
                        try:
                            vals.append(frechet(data, setup, method, n, placement=pl))
                        except ValueError:
                            vals.append(float("nan"))
                scores[pl] = vals
            # Rank by the mean log-FD over both problems and both NFE.
            rank = {
                pl: np.mean(np.log(np.maximum(v, 1e-12))) if np.all(np.isfinite(v)) else np.inf
                for pl, v in scores.items()
            }
            best = min(rank, key=rank.get)
            cells = []
            for pl in places:
                v = scores[pl]
                cell = f"{fmt(v[0])} / {fmt(v[1])} ; {fmt(v[2])} / {fmt(v[3])}"
                cells.append(f"**{cell}**" if pl == best else cell)
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
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
    args = parser.parse_args()
    t0 = time.perf_counter()
    probs = problems()
    table = None if args.no_main else main_table(probs)
    study = study_table(probs) if args.study else None
    print(f"done in {time.perf_counter() - t0:.0f} s on {jax.devices()[0].platform}")
    if args.write:
        text = DOC.read_text()
        if table is not None:
            text = replace_section(text, "SAMPLER TABLE", table)
        if study is not None:
            text = replace_section(text, "PLACEMENT STUDY", study)
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
