"""Two JAX processes on localhost train like one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.test_end_to_end import ROOT, _env, _final_params

ARGS = (
    "--config=configs/digits.py:quick",
    "--config.train.num_steps=6",
    "--config.train.checkpoint_every_steps=3",
    "--config.model.kwargs.dropout=0.0",
    # A tiny model (one resolution, no attention) and no sample grid: this test is about
    # the runtime, not the model. Each of the three processes compiles init, train step
    # and checkpoint checksums cold; the one-level model halves that.
    "--config.model.kwargs.base_channels=8",
    "--config.model.kwargs.num_groups=4",
    "--config.model.kwargs.channel_mult=(1,)",
    "--config.model.kwargs.attention_resolutions=()",
    "--config.model.kwargs.mid_attention=False",
    "--config.sample.num_images=0",
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([r["loss"] for r in map(json.loads, f)])


def test_two_processes_match_one(tmp_path):
    train = os.path.join(ROOT, "launch", "train.py")
    single = str(tmp_path / "single")
    subprocess.run(
        [sys.executable, train, *ARGS, f"--workdir={single}"],
        cwd=ROOT,
        env=_env(devices=2),
        check=True,
        capture_output=True,
        timeout=600,
    )
    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                "timeout",
                "600",
                sys.executable,
                train,
                *ARGS,
                f"--workdir={multi}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=_env(devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
    step_m, params_m = _final_params(multi)
    step_s, params_s = _final_params(single)
    assert step_m == step_s == 6
    for a, b in zip(params_m, params_s, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
