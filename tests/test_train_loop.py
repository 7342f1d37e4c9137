"""The training loop's fault handling: injected NaNs stop (or are skipped), never saved."""

import json
import os

import numpy as np
import pytest

from configs.digits import get_config
from diffjax import data
from diffjax.train import hooks, loop


class _PoisonedDigits(data.ArraySource):
    """Digits where one record is NaN; with batch 32 and no shuffle it lands in step 3."""

    def __init__(self):
        images, labels = data.load_digits_arrays()
        super().__init__(images[:128], labels[:128], name="poisoned")
        self._images = self._images.copy()
        self._images[70, 0, 0, 0] = np.nan


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(loop.data_lib, "make_source", lambda **kw: _PoisonedDigits())
    real = loop.data_lib.make_iterator
    monkeypatch.setattr(
        loop.data_lib, "make_iterator", lambda src, **kw: real(src, **{**kw, "shuffle": False})
    )


def _config(skip):
    config = get_config("quick")
    # A one-level U-Net without attention: these tests are about the loop's NaN handling.
    config.model.kwargs.update(
        base_channels=8,
        num_groups=4,
        channel_mult=(1,),
        attention_resolutions=(),
        mid_attention=False,
    )
    config.train.skip_nonfinite = skip
    config.train.checkpoint_every_steps = 2
    config.train.num_steps = 6
    config.sample.num_images = 0
    return config


def test_nonfinite_step_stops_the_run_naming_the_step(poisoned, tmp_path):
    with pytest.raises(hooks.NonFiniteError, match="at step 3") as info:
        loop.train_and_evaluate(_config(False), str(tmp_path))
    assert "skip_nonfinite" in str(info.value)
    # Only finite checkpoints exist (the guard keeps the state finite; restore verifies it).
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert steps and max(steps) <= 4


def test_nonfinite_step_is_skipped_when_configured(poisoned, tmp_path):
    loop.train_and_evaluate(_config(True), str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[1]["skipped_steps"] == 1  # the window holding step 3
    assert all(np.isfinite(r["loss"]) for r in records)


def test_text_conditioned_digits_train_and_sample_from_captions(tmp_path):
    from configs.digits_text import get_config as text_config
    from diffjax.generate import Generator

    config = text_config("quick")
    # One resolution with its cross-attention block, no mid block: the text path (token
    # ids -> encoder -> cross-attention) is all there, at half the compile time.
    config.model.kwargs.update(channel_mult=(1,), attention_resolutions=(8,), mid_attention=False)
    loop.train_and_evaluate(config, str(tmp_path))
    assert os.path.exists(tmp_path / "samples" / "step_00000008.png")
    sampler = Generator.from_workdir(str(tmp_path), num_steps=2)
    images, labels = sampler.generate(4, labels=[3], batch_size=4)
    assert images.shape == (4, 8, 8, 1) and labels.tolist() == [3, 3, 3, 3]
