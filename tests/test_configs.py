"""Every config under configs/ loads, has the contract fields and builds its model abstractly."""

import glob
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import pytest

from diffjax import experiment

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


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cases():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        if name in ("base", "__init__"):
            continue
        for arg in ARGS.get(name, [None]):
            yield pytest.param(path, arg, id=f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize(("path", "arg"), list(_cases()))
def test_config_builds(path, arg):
    config = _load(path).get_config(arg)
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


def test_base_fields_all_have_comments():
    lines = open(os.path.join(ROOT, "configs", "base.py")).read().splitlines()
    fields = [
        ln
        for ln in lines
        if ln.strip().startswith(("c.", "d.", "m.", "f.", "t.", "s.", "e.")) and " = " in ln
    ]
    assert fields and all("#" in ln for ln in fields if "ConfigDict()" not in ln)
