"""Every config under configs/ loads, has the contract fields and builds its model abstractly."""

import glob
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from diffjax import experiment
from diffjax.config import get_base_config, load_config_file
from diffjax.diffusion import schedules
from diffjax.pretrained.stage import apply_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT = [
    "seed",
    "train.num_steps",
    "train.batch_size",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "mesh.data",
    "mesh.fsdp",
]
# Configs that take an argument are built with each of these.
ARGS = {"imagenet256_dit": ["S/2", "XL/2"]}


def _cases():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "__init__":
            continue
        for arg in ARGS.get(name, [None]):
            yield pytest.param(path, arg, id=f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize(("path", "arg"), list(_cases()))
def test_config_builds(path, arg):
    config = load_config_file(path, arg)
    if config.get("pretrained", "") is None:  # a fine-tune: resolved from a pipeline
        config.pretrained = os.path.join(ROOT, "tests", "fixtures", "pipelines", "tiny-sd")
        config = apply_pretrained(config)
    assert isinstance(config, ml_collections.ConfigDict)
    for field in CONTRACT:
        node = config
        for key in field.split("."):
            assert key in node, f"{path} lacks {field}"
            node = node[key]
    model = experiment.build_model(config)
    params = jax.eval_shape(experiment.make_init_fn(model, config), jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params))) > 0
    experiment.build_loss(config, experiment.build_schedule(config))
    if config.get("base_workdir", "") is None:  # adapts a trained run: it must be named
        with pytest.raises(ValueError, match="--config.base_workdir=RUN"):
            experiment.check_config(config)
        return
    experiment.check_config(config)


def test_base_fields_all_have_comments():
    lines = open(os.path.join(ROOT, "diffjax", "config.py")).read().splitlines()
    fields = [
        ln
        for ln in lines
        if ln.strip().startswith(("c.", "d.", "m.", "f.", "t.", "s.", "e.")) and " = " in ln
    ]
    assert fields and all("#" in ln for ln in fields if "ConfigDict()" not in ln)


# Each schedule's own fields, with a value other than the default.
SCHEDULE_OVERRIDES = {
    "discrete_vp": {"beta_end": 0.03, "beta_schedule": "cosine", "num_timesteps": 500},
    "continuous_vp": {"beta_min": 0.5, "beta_max": 10.0, "t_min": 1e-2},
    "edm": {"sigma_min": 0.01, "sigma_max": 40.0, "sigma_data": 0.7},
    "flow": {"sigma_min": 0.01, "sigma_max": 40.0},
}


def _config(schedule: str, **diffusion) -> ml_collections.ConfigDict:
    config = get_base_config()
    config.model.kwargs = ml_collections.ConfigDict(
        dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, num_groups=4)
    )
    config.diffusion.schedule = schedule
    config.diffusion.prediction = "x0" if schedule == "edm" else "epsilon"
    config.diffusion.loss_weighting = "uniform"
    config.sample.method = "euler"
    for k, v in diffusion.items():
        config.diffusion[k] = v
    return config


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_OVERRIDES))
def test_each_schedule_field_reaches_the_schedule(schedule):
    """Every field of a schedule changes what that schedule computes (none is dropped)."""

    def observe(sched):
        t = np.linspace(0.1, 0.9, 5) * sched.t_max
        x = np.linspace(-1.0, 1.0, 5).reshape(5, 1).astype(np.float32)
        denoised = sched.precondition(lambda x, t: x + t[:, None])(x, t)
        parts = (*sched.alpha_sigma(t), sched.logsnr_range, sched.t_max, sched.t_min, denoised)
        return np.concatenate([np.ravel(np.asarray(p, np.float64)) for p in parts])

    base = observe(experiment.build_schedule(_config(schedule)))
    for field, value in SCHEDULE_OVERRIDES[schedule].items():
        assert field in schedules.schedule_arguments(schedule)
        changed = observe(experiment.build_schedule(_config(schedule, **{field: value})))
        assert not np.allclose(base, changed), f"diffusion.{field} does not reach {schedule}"


@pytest.mark.parametrize(
    ("schedule", "field", "value"),
    [
        ("continuous_vp", "beta_end", 0.03),
        ("discrete_vp", "beta_min", 0.5),
        ("discrete_vp", "sigma_max", 40.0),
        ("flow", "p_mean", 0.0),
    ],
)
def test_a_field_of_another_schedule_is_refused(schedule, field, value):
    config = _config(schedule, **{field: value})
    with pytest.raises(ValueError, match=f"diffusion.{field}=.* not used by diffusion.schedule"):
        experiment.check_config(config)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("diffusion", "min_snr_gamma", 3.0, "used only with diffusion.loss_weighting='min_snr'"),
        ("sample", "method", "bogus", "unknown sampler method 'bogus'"),
        ("sample", "eta", 0.5, "eta applies to"),
        ("sample", "guidance", -1.0, "sample.guidance must be >= 0"),
        ("train", "num_steps", -5, "train.num_steps must be >= 1"),
        ("model", "kwargs.no_such_field", 3, "Unknown argument"),
    ],
)
def test_check_config_refuses_before_any_work(section, field, value, message):
    config = _config("discrete_vp")
    node = config[section]
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    with node.unlocked() if hasattr(node, "unlocked") else node:
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        experiment.check_config(config)


def test_old_run_configs_are_upgraded():
    """config.json of earlier versions: removed fields dropped, the old eta default kept."""
    saved = get_base_config().to_dict()
    saved["data"]["shuffle_buffer"] = 0
    saved["sample"]["batch_size"] = 256
    saved["sample"]["eta"] = 0.0
    saved["sample"]["method"] = "dpmpp_2m_sde"
    config = experiment.upgrade_config(saved)
    assert "shuffle_buffer" not in config.data and "batch_size" not in config.sample
    assert config.sample.eta is None  # dpmpp_2m_sde keeps its default eta (1), as before
    assert "eta" not in experiment.sampler_kwargs(config)
