"""The PyTorch reference, run inside a worker process (`common.Worker`).

diffusers' `UNet2DModel` / `DiTTransformer2DModel` configured from the same model
kwargs as the diffjax model, with the parameter count checked against diffjax's
(`build_reference` refuses a mismatch over 1%), trained with the same objective
(epsilon MSE, plus the learned-variance bound for learned-sigma models),
condition dropout, gradient clipping, AdamW and an EMA, and sampled with
diffusers' DPM-Solver++(2M) scheduler and batched classifier-free guidance.

Two adaptations, both in the reference's favour or neutral:
  * diffusers' DiT gives every block its own copy of the timestep/class embedder
    (DiT shares one); the copies are tied to the first block's, which makes the
    parameters identical in number to DiT's and leaves a small per-block
    recomputation of the shared embedding (per example, not per token).
  * the optimizer is torch's AdamW with its fastest available implementation
    (`fused=True`, else `foreach=True`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks import common


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- models


def _unet(spec: dict[str, Any]):
    from diffusers import UNet2DModel

    k = spec["kwargs"]
    unsupported = {
        "context_dim": 0,
        "text_vocab_size": 0,
        "time_embedding": "sinusoidal",
        "conv_resample": True,
        "out_channels": 0,
    }
    for key, ok in unsupported.items():
        if k.get(key, ok) != ok:
            raise ValueError(f"The diffusers reference has no equivalent of UNet {key}={k[key]!r}.")
    base, mult = k["base_channels"], list(k["channel_mult"])
    attn_res = set(k.get("attention_resolutions", ()))
    size = spec["image_size"]
    res = [size // 2**i for i in range(len(mult))]
    channels = [base * m for m in mult]
    attn_levels = [i for i, r in enumerate(res) if r in attn_res]
    # diffusers fixes channels per head; diffjax fixes heads (or channels per head).
    widths = {channels[i] for i in attn_levels} | (
        {channels[-1]} if k.get("mid_attention", True) else set()
    )
    head_channels = k.get("head_channels", 0)
    if not head_channels and k.get("num_heads", 1) == 1:
        head_channels = None  # diffusers: one head as wide as each block
    elif not head_channels:
        if len(widths) > 1:
            raise ValueError(
                "diffusers uses one head width for every attention level; this model has "
                f"{k.get('num_heads', 1)} heads at widths {sorted(widths)}."
            )
        head_channels = widths.pop() // k.get("num_heads", 1) if widths else None
    groups = k.get("num_groups", 32)
    out_ch = spec["channels"] * (2 if k.get("learn_sigma", False) else 1)
    updown = "resnet" if k.get("resblock_updown", False) else "conv"
    num_classes = k.get("num_classes", 0)
    return UNet2DModel(
        sample_size=size,
        in_channels=spec["channels"],
        out_channels=out_ch,
        block_out_channels=tuple(channels),
        down_block_types=tuple(
            "AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(len(mult))
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(len(mult)))
        ),
        layers_per_block=k.get("num_res_blocks", 2),
        attention_head_dim=head_channels,
        norm_num_groups=groups,
        attn_norm_num_groups=groups,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if k.get("scale_shift_norm", False) else "default",
        add_attention=k.get("mid_attention", True),
        num_class_embeds=num_classes + 1 if num_classes else None,
        dropout=k.get("dropout", 0.0),
        downsample_type=updown,
        upsample_type=updown,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _dit(spec: dict[str, Any]):
    from diffusers import DiTTransformer2DModel

    k = spec["kwargs"]
    if k.get("context_dim", 0) or k.get("text_vocab_size", 0):
        raise ValueError("The diffusers DiT reference has no text cross-attention.")
    if float(k.get("mlp_ratio", 4.0)) != 4.0:
        raise ValueError("diffusers' DiT has a fixed MLP ratio of 4.")
    if not k.get("num_classes", 0):
        raise ValueError("diffusers' DiT is class-conditional; num_classes must be > 0.")
    d, heads = k["hidden_size"], k["num_heads"]
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=d // heads,
        in_channels=spec["channels"],
        out_channels=spec["channels"] * (2 if k.get("learn_sigma", True) else 1),
        num_layers=k["depth"],
        sample_size=spec["image_size"],
        patch_size=k["patch_size"],
        num_embeds_ada_norm=k["num_classes"],
    )
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    # The training step drops labels itself (the config's cond_dropout), as diffjax does.
    shared.class_embedder.dropout_prob = 0.0
    return model


def build_reference(spec: dict[str, Any], expected_params: int) -> torch.nn.Module:
    """The diffusers model for a diffjax model spec; checks the parameter count.

    Raises:
      ValueError: unsupported features, or parameter counts more than 1% apart.
    """
    builder = {"unet": _unet, "dit": _dit}.get(spec["model"])
    if builder is None:
        raise ValueError(f"No PyTorch reference for model {spec['model']!r}.")
    model = builder(spec)
    n = sum(p.numel() for p in model.parameters())
    if abs(n - expected_params) > 0.01 * expected_params:
        raise ValueError(
            f"PyTorch reference has {n:,} parameters, diffjax {expected_params:,}: "
            "more than 1% apart, the architectures differ."
        )
    return model


# ----------------------------------------------------------------------------- diffusion


class Diffusion:
    """Discrete VP (DDPM) tables, the training objective and the sampler, in torch."""

    def __init__(self, spec: dict[str, Any], device: torch.device):
        f = spec["diffusion"]
        if f["schedule"] != "discrete_vp" or f["prediction"] != "epsilon":
            raise ValueError("The reference covers discrete_vp with epsilon prediction.")
        if f["loss_weighting"] not in ("eps_mse", "min_snr"):
            raise ValueError("The reference covers the eps_mse and min_snr loss weightings.")
        self.weighting = f["loss_weighting"]
        self.min_snr_gamma = float(f.get("min_snr_gamma", 5.0))
        n = f["num_timesteps"]
        if f["beta_schedule"] != "linear":
            raise ValueError("The reference covers the linear beta schedule.")
        betas = np.linspace(f["beta_start"], f["beta_end"], n, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tab = {
            "snr": abar / (1.0 - abar),
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "log_beta": np.log(betas),
            "post_logvar": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
            "coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        }
        self.tab = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in tab.items()}
        self.n = n
        self.betas = betas
        self.learn_sigma = bool(spec["kwargs"].get("learn_sigma", False))
        self.channels = spec["channels"]

    def _g(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tab[name][t].view(-1, 1, 1, 1)

    def loss(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, eps, t) -> torch.Tensor:
        """Weighted epsilon MSE (+ the improved-DDPM bound on the variance channels).

        Min-SNR-gamma on an epsilon network weighs the MSE by min(1, gamma / SNR)
        (Hang et al. 2023), as `diffjax.diffusion.losses.loss_weight` does.
        """
        out = out.float()
        pred, v = out.chunk(2, dim=1) if self.learn_sigma else (out, None)
        mse = (pred - eps).square().mean(dim=(1, 2, 3))
        if self.weighting == "min_snr":
            mse = mse * torch.clamp(self.min_snr_gamma / self.tab["snr"][t], max=1.0)
        if not self.learn_sigma:
            return mse.mean()
        eps_sg = pred.detach()
        sa, s1 = self._g("sqrt_abar", t), self._g("sqrt_1m_abar", t)
        x0_pred = (x_t - s1 * eps_sg) / sa
        cx0, cxt = self._g("coef_x0", t), self._g("coef_xt", t)
        true_mean = cx0 * x0 + cxt * x_t
        model_mean = cx0 * x0_pred + cxt * x_t
        frac = (v + 1) / 2
        post_lv = self._g("post_logvar", t)
        model_lv = frac * self._g("log_beta", t) + (1 - frac) * post_lv
        kl = 0.5 * (
            -1.0 + model_lv - post_lv + torch.exp(post_lv - model_lv)
            + (true_mean - model_mean).square() * torch.exp(-model_lv)
        ).mean(dim=(1, 2, 3))  # fmt: skip
        log_scale = 0.5 * model_lv
        centered = x0 - model_mean
        inv = torch.exp(-log_scale)

        def cdf(z):
            return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

        cdf_plus = cdf(inv * (centered + 1 / 255))
        cdf_minus = cdf(inv * (centered - 1 / 255))
        log_like = torch.where(
            x0 < -0.999,
            torch.log(cdf_plus.clamp(min=1e-12)),
            torch.where(
                x0 > 0.999,
                torch.log((1 - cdf_minus).clamp(min=1e-12)),
                torch.log((cdf_plus - cdf_minus).clamp(min=1e-12)),
            ),
        )
        nll = -log_like.mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll, kl) / math.log(2.0)
        return (mse + vb).mean()

    def scheduler(self, spec: dict[str, Any]):
        from diffusers import DPMSolverMultistepScheduler

        f = spec["diffusion"]
        return DPMSolverMultistepScheduler(
            num_train_timesteps=self.n,
            beta_start=f["beta_start"],
            beta_end=f["beta_end"],
            beta_schedule="linear",
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="epsilon",
            # diffjax's dpmpp_2m default grid on a discrete schedule is uniform in log-SNR.
            use_lu_lambdas=True,
        )


# ----------------------------------------------------------------------------- worker


class TorchWorker:
    """Request handlers of the PyTorch worker: one case at a time."""

    def __init__(self, threads: int):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            if threads > 0:
                torch.set_num_threads(threads)
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.threads = torch.get_num_threads()
        self.model = None
        # Import the model classes now, so that RSS deltas leave the library out.
        import diffusers  # noqa: F401
        from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel  # noqa: F401

        self.base_rss = common.rss_bytes()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            "info": self.info,
            "matmul": self.matmul,
            "setup_train": self.setup_train,
            "train_window": self.train_window,
            "train_memory": self.train_memory,
            "setup_sample": self.setup_sample,
            "sample_window": self.sample_window,
            "sample_memory": self.sample_memory,
            "release": self.release,
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def info(self, matmul_size: int = 0) -> dict[str, Any]:
        import diffusers

        out = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": str(self.device),
            "threads": self.threads,
        }
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name()
            out["matmul_flops"] = self.matmul(matmul_size or 8192, torch.bfloat16)
        else:
            out["matmul_flops"] = self.matmul(matmul_size or 2048)
        return out

    def matmul(self, size: int, dtype: Any = torch.float32) -> float:
        """FLOP/s of the best of 5 `size`^3 matmuls."""
        a = torch.randn(size, size, dtype=dtype, device=self.device)
        b = torch.randn(size, size, dtype=dtype, device=self.device)
        a @ b
        self._sync()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            self._sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * size**3 / best

    def _autocast(self):
        if self.spec["dtype"] == "float32":
            return contextlib.nullcontext()
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[self.spec["dtype"]]
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, x, t, labels):
        if self.spec["model"] == "dit":
            return self.model_fn(x, timestep=t, class_labels=labels).sample
        return self.model_fn(x, t, class_labels=labels).sample

    def setup_train(self, spec: dict[str, Any], params: int, batch: int) -> dict[str, Any]:
        self.release()
        _malloc_trim()
        self.base_rss = common.rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.spec = spec
        torch.manual_seed(0)
        self.model = build_reference(spec, params).to(self.device)
        self.model.train()
        # BENCH_TORCH_COMPILE=1 (run.py --torch-compile): the reference under torch.compile;
        # its compilation happens in the warm-up steps below.
        self.compiled = os.environ.get("BENCH_TORCH_COMPILE") == "1"
        self.model_fn = torch.compile(self.model) if self.compiled else self.model
        self.diffusion = Diffusion(spec, self.device)
        tc = spec["train"]
        opt_kwargs = dict(
            lr=tc["learning_rate"], betas=(tc["b1"], tc["b2"]), eps=tc["eps"],
            weight_decay=tc["weight_decay"],
        )  # fmt: skip
        try:
            self.opt = torch.optim.AdamW(self.model.parameters(), fused=True, **opt_kwargs)
            self.opt_impl = "fused"
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(self.model.parameters(), foreach=True, **opt_kwargs)
            self.opt_impl = "foreach"
        self.params = [p for p in self.model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.num_classes = spec["num_classes"] if spec["conditioning"] == "label" else 0
        g = torch.Generator().manual_seed(0)
        c, s = spec["channels"], spec["image_size"]
        self.batches = []
        for _ in range(2):
            x = torch.randn(batch, c, s, s, generator=g).clamp(-1, 1).to(self.device)
            y = (
                torch.randint(0, self.num_classes, (batch,), generator=g).to(self.device)
                if self.num_classes
                else None
            )
            self.batches.append((x, y))
        self.batch = batch
        t = self.train_window(2)
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "torch_compile": self.compiled,
            "warmup_step_s": t / 2,
            "optimizer": f"torch.optim.AdamW({self.opt_impl})",
        }

    def _step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        spec, dif = self.spec, self.diffusion
        b = x0.shape[0]
        if labels is not None and spec["diffusion"]["cond_dropout"] > 0:
            drop = torch.rand(b, device=self.device) < spec["diffusion"]["cond_dropout"]
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        t = torch.randint(0, dif.n, (b,), device=self.device)
        eps = torch.randn_like(x0)
        x_t = dif._g("sqrt_abar", t) * x0 + dif._g("sqrt_1m_abar", t) * eps
        with self._autocast():
            out = self._forward(x_t, t, labels)
        loss = dif.loss(out, x0, x_t, eps, t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = spec["train"]["grad_clip"]
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - spec["train"]["ema_decay"])
        return loss

    def train_window(self, steps: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        for i in range(steps):
            loss = self._step(*self.batches[i % len(self.batches)])
        value = float(loss.detach())  # also the device sync
        seconds = time.perf_counter() - t0
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} in the PyTorch reference")
        return seconds

    def _memory(self, base: int) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                "peak_bytes": int(torch.cuda.max_memory_allocated()),
                "kind": "torch.cuda.max_memory_allocated",
            }
        return {
            "peak_bytes": max(0, common.peak_rss_bytes() - base),
            "kind": "peak RSS - RSS before setup",
        }

    def train_memory(self) -> dict[str, Any]:
        return self._memory(self.base_rss)

    def setup_sample(self, batch: int, steps: int, guidance: float) -> dict[str, Any]:
        self.opt = None
        self.batches = []
        self.model.eval()
        _malloc_trim()
        self.sample_base_rss = common.rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # Sample with the EMA weights, as diffjax does.
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                p.copy_(e)
        self.ema = None
        self.scheduler = self.diffusion.scheduler(self.spec)
        c, s = self.spec["channels"], self.spec["image_size"]
        g = torch.Generator().manual_seed(1)
        self.noise = torch.randn(batch, c, s, s, generator=g).to(self.device)
        self.guided = bool(self.num_classes) and guidance != 1.0
        self.guidance = guidance
        self.steps = steps
        self.sample_labels = (
            (torch.arange(batch) % self.num_classes).to(self.device) if self.num_classes else None
        )
        t = self.sample_window(1)
        _malloc_trim()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return {"first_run_s": t, "nfe": steps, "guided": self.guided, "batch": batch}

    @torch.inference_mode()
    def _sample(self) -> torch.Tensor:
        sched, c = self.scheduler, self.spec["channels"]
        sched.set_timesteps(self.steps, device=self.device)
        x = self.noise * sched.init_noise_sigma
        b = x.shape[0]
        if self.guided:
            null = torch.full_like(self.sample_labels, self.num_classes)
            labels = torch.cat([self.sample_labels, null])
        else:
            labels = self.sample_labels
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if self.guided else x
            tt = t.expand(xin.shape[0])
            with self._autocast():
                out = self._forward(xin, tt, labels)
            eps = out[:, :c].float()
            if self.guided:
                cond, uncond = eps[:b], eps[b:]
                eps = uncond + self.guidance * (cond - uncond)
            x = sched.step(eps, t, x).prev_sample
        return x

    def sample_window(self, reps: int) -> float:
        self._sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            x = self._sample()
        self._sync()
        seconds = time.perf_counter() - t0
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite samples from the PyTorch reference")
        return seconds

    def sample_memory(self) -> dict[str, Any]:
        return self._memory(self.sample_base_rss)

    def release(self) -> None:
        self.model = self.opt = self.ema = None
        self.batches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        _malloc_trim()


def main(threads: int) -> None:
    """Serves PyTorch benchmark requests on stdin/stdout until stdin closes."""
    common.serve(TorchWorker(threads).handlers())
