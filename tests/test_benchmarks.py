"""benchmarks/run.py: the quick CPU suite end to end (no PyTorch), and the reference's checks."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import run as bench_run
from benchmarks.common import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_suite_measures_and_writes_json(tmp_path):
    env = dict(os.environ)
    # One device is what the benchmark measures; conftest's 8 simulated ones split the pool.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--suite", "cpu",
           "--quick", "--no-torch", "--cases", "dit_tiny", "--experiments", "sampler",
           "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| case" in proc.stdout and "dit_tiny" in proc.stdout

    (path,) = glob.glob(str(tmp_path / "cpu-quick_cpu_*.json"))
    result = json.load(open(path))
    assert result["suite"] == "cpu" and result["quick"] and result["errors"] == []
    assert result["peak_flops"] > 0 and "measured" in result["peak_source"]

    (case,) = result["cases"]
    dj = case["diffjax"]
    train = dj["train"]
    assert train["img_per_s"] > 0 and 0 < train["mfu"] < 1
    # MFU is 3 x forward FLOPs x img/s over the peak, from the same numbers.
    expect = 3 * case["forward_gflops"] * 1e9 * train["img_per_s"] / result["peak_flops"]
    assert train["mfu"] == pytest.approx(expect, rel=1e-9)
    assert case["params"] > 0 and dj["setup"]["compile_s"] > 0
    assert train["memory"]["peak_bytes"] >= 0 and "RSS" in train["memory"]["kind"]
    sample = dj["sample_setup"]
    assert sample["nfe"] == 4 and sample["guided"] and sample["compile_s"] > 0
    assert dj["sample"]["latency_per_image_ms"] > 0

    (exp,) = result["experiments"]
    assert exp["name"] == "sampler" and exp["ratio"] > 0
    # The Python loop of jitted DPM-Solver++(2M) steps is the same algorithm, compiled
    # differently: float32 rounding, amplified by 1/alpha ~ 150 at the first step (x0
    # from an epsilon net at t = 999), differs by 1.5e-4 on an AVX-512 CPU (under 1e-4
    # without AVX-512): 1e-3 is still three orders below the images' scale.
    assert exp["max_abs_diff_vs_python_loop"] < 1e-3
    counts = exp["compiles_once_per_shape"]
    assert counts["same_shape_3_calls"] == {"traces": 1, "compiles": 1}
    assert counts["after_2_calls_at_new_shape"] == {"traces": 2, "compiles": 2}
    assert exp["scan_loops"] == [3]  # one loop of num_steps - 1 solver steps


def test_gpu_cases_fall_back_to_xla_attention_off_gpu():
    case = Case("c", "configs/imagenet256_dit.py:B/2", 4, 2,
                (("model.dtype", "bfloat16"), ("model.kwargs.attention_impl", "cudnn")))  # fmt: skip
    cpu_case, notes = bench_run.for_backend(case, "cpu")
    assert dict(cpu_case.overrides)["model.kwargs.attention_impl"] == "xla" and notes
    assert bench_run.for_backend(case, "gpu") == (case, [])


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None,
    reason="the PyTorch reference needs torch and diffusers",
)
def test_reference_matches_parameter_counts():
    from benchmarks import jax_bench, torch_reference
    from diffjax import experiment
    from diffjax.models.summary import model_summary

    for case in (
        Case("u", "configs/digits.py", 2, 2),
        Case("d", "configs/imagenet256_dit.py:S/8", 2, 2, (("data.image_size", 16),)),
    ):
        config = jax_bench.load_config(case)
        n = model_summary(experiment.build_model(config), image_size=config.data.image_size,
                          channels=config.data.channels)["params"]  # fmt: skip
        spec = jax_bench.model_spec(config)
        model = torch_reference.build_reference(spec, n)
        assert sum(p.numel() for p in model.parameters()) == n
        with pytest.raises(ValueError, match="more than 1% apart"):
            torch_reference.build_reference(spec, int(n * 1.05))


def test_pretrained_quick_writes_json(tmp_path):
    """benchmarks/pretrained.py --quick --no-torch: every case measured, the JSON complete."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "pretrained.py"), "--suite", "cpu",
           "--quick", "--no-torch", "--cases", "unet,t2i,vae", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| case" in proc.stdout and "t2i" in proc.stdout

    (path,) = glob.glob(str(tmp_path / "pretrained_cpu-quick_cpu_*.json"))
    result = json.load(open(path))
    assert result["benchmark"] == "pretrained" and result["errors"] == []
    assert result["torch"] is None and len(result["load_avg_before"]) == 3
    # The shared random-weight pipeline: every component written, counts recorded.
    assert set(result["weights"]["params"]) == {
        "unet", "vae", "vae_mem", "text_encoder", "train_unet"
    }  # fmt: skip
    cases = {c["name"]: c for c in result["cases"]}
    assert list(cases) == ["unet_float32", "t2i", "vae_full", "vae_tiled"]
    for c in cases.values():
        dj = c["diffjax"]
        assert c["params"] > 0 and dj["ms"] > 0 and len(dj["window_s"]) == 2
        assert dj["setup"]["load_s"] >= 0 and dj["setup"]["first_run_s"] > 0
        assert "ratio" not in c  # no diffusers side
    assert cases["unet_float32"]["params"] == result["weights"]["params"]["unet"]
    assert cases["unet_float32"]["diffjax"]["setup"]["compile_s"] > 0
    t2i = result["weights"]["params"]
    assert cases["t2i"]["params"] == t2i["unet"] + t2i["vae"] + t2i["text_encoder"]
    assert cases["t2i"]["diffjax"]["setup"]["method"] == "ddim"
    full, tiled = cases["vae_full"]["diffjax"]["setup"], cases["vae_tiled"]["diffjax"]["setup"]
    # XLA's plan of one 8x8 tile is smaller than that of the whole 16x16 latent.
    assert 0 < tiled["memory"]["total_bytes"] < full["memory"]["total_bytes"]
    assert tiled["tile"] == 8 and tiled["overlap"] == 2 and full["tile"] is None
    assert tiled["memory"]["host_blend_bytes"] > 0


def test_pretrained_quick_encode_train_and_lora(tmp_path):
    """pretrained.py --cases encode,train,lora: diffjax's encode, real latent train step,
    and its LoRA step beside the full one, run."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "pretrained.py"), "--suite", "cpu",
           "--quick", "--no-torch", "--cases", "encode,train,lora", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "img/s" in proc.stdout and "steps/s" in proc.stdout
    assert "lora_r4 / lora_full: diffjax img/s" in proc.stdout

    (path,) = glob.glob(str(tmp_path / "pretrained_cpu-quick_cpu_*.json"))
    result = json.load(open(path))
    assert result["errors"] == [] and result["torch"] is None
    cases = {c["name"]: c for c in result["cases"]}
    assert list(cases) == ["encode_float32", "train_float32", "lora_full", "lora_r4"]
    enc, train = cases["encode_float32"], cases["train_float32"]
    for c in cases.values():
        assert c["diffjax"]["ms"] > 0 and len(c["diffjax"]["window_s"]) == 2
    # The quick VAE has two levels: 16 px images -> 8x8x4 latents.
    assert enc["params"] == result["weights"]["params"]["vae_mem"]
    assert enc["diffjax"]["setup"]["latent_shape"] == [8, 8, 4]
    s = train["diffjax"]["setup"]
    assert train["params"] == result["weights"]["params"]["train_unet"]
    assert s["compile_s"] > 0 and s["param_dtype"] == "float32" and s["first_loss"] > 0
    assert s["memory"]["total_bytes"] > 0

    full, lo = cases["lora_full"]["diffjax"]["setup"], cases["lora_r4"]["diffjax"]["setup"]
    n = result["weights"]["params"]["train_unet"]
    assert full["params"] == full["model_params"] == lo["model_params"] == n
    # The quick U-Net's one transformer block (the middle one), width w, context c: a
    # rank-r LoRA on attn1's q/k/v/out (w -> w) and attn2's q/out (w -> w), k/v (c -> w).
    u = result["plan"]["train_unet"]
    w, c, r = u["block_out_channels"][-1], u["cross_attention_dim"], 4
    assert lo["lora_modules"] == 8
    assert lo["params"] == r * (6 * 2 * w + 2 * (c + w))
    # B = 0: the LoRA step's first loss is the full step's (same base, batch and rng).
    assert lo["first_loss"] == pytest.approx(full["first_loss"], rel=1e-5)
    for st in (full, lo):
        b = st["state_bytes"]
        assert 8 * st["params"] <= b["opt_state"] <= 8 * st["params"] + 64  # AdamW mu, nu
        # XLA's arguments hold the state, the frozen base and the batch.
        assert st["memory"]["argument_bytes"] >= sum(b.values())
    assert lo["state_bytes"]["frozen"] == 4 * n and full["state_bytes"]["frozen"] == 0
    assert lo["memory"]["argument_bytes"] < full["memory"]["argument_bytes"]


def test_pretrained_quick_controlnet(tmp_path):
    """pretrained.py --cases cn_sd_controlnet: the SD ControlNet step on the quick U-Net runs,
    trains the ControlNet only (its condition embedding counted in closed form) beside the
    frozen base, and gets a row in the ControlNet table."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "pretrained.py"), "--suite", "cpu",
           "--quick", "--no-torch", "--cases", "cn_sd_controlnet", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ControlNet step vs the base's full step" in proc.stdout

    (path,) = glob.glob(str(tmp_path / "pretrained_cpu-quick_cpu_*.json"))
    result = json.load(open(path))
    assert result["errors"] == [] and result["torch"] is None
    (case,) = result["cases"]
    assert case["name"] == "cn_sd_controlnet" and case["diffjax"]["ms"] > 0
    s, spec = case["diffjax"]["setup"], case["spec"]
    assert s["controlnet"] and s["first_loss"] > 0
    # The control image is the latents' size times the VAE factor, 3 channels.
    b, n, f = spec["batch"], spec["latent"], spec["control"]["downsample"]
    assert s["batch_shapes"]["control"] == [b, n * f, n * f, 3]

    # Condition embedding: conv_in, per stage a 3x3 conv and a stride-2 3x3 conv, conv_out
    # to the U-Net's first width; zero convs: a 1x1 conv per skip (conv_in, each resnet, each
    # downsampler) and the mid block's (biases included).
    def conv(i, o, k=3):
        return k * k * i * o + o

    u, w = result["plan"]["train_unet"], spec["control"]["embedding_channels"]
    widths, layers = u["block_out_channels"], u["layers_per_block"]
    emb = conv(3, w[0]) + conv(w[-1], widths[0])
    emb += sum(conv(a, a) + conv(a, z) for a, z in zip(w[:-1], w[1:], strict=True))
    skips = [widths[0]] + [
        c for i, c in enumerate(widths) for _ in range(layers + (i < len(widths) - 1))
    ]
    zero = sum(conv(c, c, 1) for c in skips) + conv(widths[-1], widths[-1], 1)
    assert s["embedding_params"] == emb
    # Only the ControlNet trains: its embedding, zero convs and the copied encoder half.
    n_base = result["weights"]["params"]["train_unet"]
    assert s["model_params"] == n_base and 0 < s["copied_params"] < n_base
    assert case["params"] == s["copied_params"] + emb + zero
    sb = s["state_bytes"]
    assert sb["params"] == sb["ema_params"] == 4 * case["params"]
    assert 8 * case["params"] <= sb["opt_state"] <= 8 * case["params"] + 64  # AdamW mu, nu
    assert sb["frozen"] == 4 * n_base
    # XLA's arguments hold the state, the frozen base and the batch (with the control).
    assert s["memory"]["argument_bytes"] >= sum(sb.values()) + 4 * b * (n * f) ** 2 * 3
