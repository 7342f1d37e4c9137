"""Training a LoRA over a frozen base run (configs/digits_lora.py on a tiny digits run).

Only the LoRA is trained, checkpointed and in the optimizer; the base is recorded by hash,
never written; sampling and exports use the merged model; a resumed run is bitwise the
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.digits import get_config as digits_config
from configs.digits_lora import get_config
from diffjax import experiment, parallel
from diffjax.export import ExportError, export_lora
from diffjax.finetune import lora
from diffjax.generate import Generator
from diffjax.pretrained.frozen import FrozenComponentError, check_frozen, tree_sha256
from diffjax.rundir import load_state, load_workdir_config
from diffjax.train import train_and_evaluate


def _tree_files_sha(directory: str) -> str:
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora") / "base")
    c = digits_config("quick")
    c.sample.num_images = 0
    # One level with attention at 8x8: convs, attention and a third of the compile.
    c.model.kwargs.update(channel_mult=(1,), attention_resolutions=(8,), mid_attention=False)
    train_and_evaluate(c, workdir)
    return workdir


def _lora_config(base, **train):
    c = get_config("quick")
    c.base_workdir = base
    c.lora.dropout = 0.1  # the runtime path (lora.runtime) in the step; sampling merges
    c.sample.num_images = 0
    c.train.update(dict(num_steps=4, checkpoint_every_steps=2, keep_checkpoints=3, **train))
    return c


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    before = _tree_files_sha(base)
    workdir = str(tmp_path_factory.mktemp("lora") / "run")
    train_and_evaluate(_lora_config(base), workdir)
    assert _tree_files_sha(base) == before  # the base run is never written
    return workdir


def _state(workdir):
    config = load_workdir_config(workdir)
    return load_state(config, workdir, parallel.make_mesh(-1, 1))


def test_only_the_lora_is_trained_checkpointed_and_in_the_optimizer(base, run):
    state, step, parts = _state(run)
    assert step == 4 and sorted(state.params) == ["denoiser"]
    targets = parts.lora_targets["denoiser"]
    assert sorted(state.params["denoiser"]) == targets
    assert any(".attn." in t for t in targets) and any(t.endswith(".conv1") for t in targets)
    n_lora = sum(x.size for x in jax.tree.leaves(state.params))
    base_state, _, _ = _state(base)
    n_base = sum(x.size for x in jax.tree.leaves(base_state.params))
    assert n_lora < 0.2 * n_base
    # AdamW's moments: two LoRA-sized trees (plus scalar counts), nothing of the base.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_lora
    # B moved from zero: the LoRA learned something.
    assert max(float(jnp.abs(v["B"]).max()) for v in state.params["denoiser"].values()) > 0
    with open(os.path.join(run, "frozen.json")) as f:
        record = json.load(f)["base"]
    assert record == {"path": base, "sha256": tree_sha256(base_state.ema_params)}


def test_lora_run_samples_and_exports_its_merged_model(base, run, tmp_path):
    state, _, parts = _state(run)
    base_state, _, _ = _state(base)
    config = load_workdir_config(run)
    merged = lora.merge(
        base_state.ema_params, state.ema_params["denoiser"], experiment.lora_scale(config)
    )
    gen = Generator.from_workdir(run)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), gen.params, merged)
    assert all(jax.tree.leaves(same))
    images, _ = gen.generate(8, seed=0, batch_size=8)
    base_images, _ = Generator.from_workdir(base).generate(8, seed=0, batch_size=8)
    assert not np.array_equal(images, base_images)

    from diffjax.export import export_params

    out = str(tmp_path / "merged")
    export_params(
        experiment.merged_config(config), parts.model, parts.schedule, gen.params, out,
        step=4, platforms=(),
    )  # fmt: skip
    exported, _ = Generator.from_export(out).generate(8, seed=0, batch_size=8)
    np.testing.assert_array_equal(exported, images)
    with pytest.raises(ExportError, match="sd_unet"):
        export_lora(config, state.ema_params, str(tmp_path / "l"), step=4)


def test_resumed_lora_run_is_bitwise_the_uninterrupted_one(base, run, tmp_path):
    part = str(tmp_path / "part")
    shutil.copytree(run, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "4"))
    train_and_evaluate(_lora_config(base), part)  # resumes at step 2
    a, _, _ = _state(run)
    b, _, _ = _state(part)
    same = jax.tree.map(
        lambda x, y: bool(jnp.all(x == y)), (a.params, a.opt_state), (b.params, b.opt_state)
    )
    assert all(jax.tree.leaves(same))


def test_a_changed_base_is_refused_on_resume(base, run):
    config = load_workdir_config(run)
    with pytest.raises(FrozenComponentError, match="base"):
        check_frozen(config, run, resuming=True, extra={"base": {"path": base, "sha256": "0" * 64}})


def test_lora_needs_a_base_and_sensible_fields():
    c = get_config("quick")
    c.base_workdir = ""
    with pytest.raises(ValueError, match="adapts a trained model"):
        experiment.check_config(c)
    c = digits_config("quick")
    c.lora.alpha = 8.0
    with pytest.raises(ValueError, match="apply only with lora.rank > 0"):
        experiment.check_config(c)
