"""Prints one JSON object describing a config's model: parameters, forward cost, memory.

    python launch/inspect_model.py --config=configs/digits.py
    python launch/inspect_model.py --config=configs/imagenet256_dit.py:XL/2 --batch_size=32

Fields: `params` (count), `forward_gflops` (per image, XLA flops of the jitted
forward = multiply-adds x 2 plus elementwise work), `forward_gmacs` (half of
that), `activation_memory_bytes` (activations the training forward saves for
the backward pass at `batch_size`, from the jaxpr: respects remat_policy, the
same on every backend), and with --compile_memory `xla_temp_bytes` (XLA's temp
buffers of the compiled forward+backward on this backend). Nothing is
allocated: the model is built with `jax.eval_shape`.
"""

import json

from absl import flags

from diffjax.cli.common import config_flag, load_config, run

_CONFIG = config_flag()
_BATCH = flags.DEFINE_integer(
    "batch_size",
    0,
    "Batch of the activation-memory estimate (0 = config.train.batch_size, the global "
    "batch; pass the per-device batch to size one accelerator).",
)
_COMPILE_MEMORY = flags.DEFINE_bool(
    "compile_memory",
    False,
    "Also compile forward+backward and report XLA's temp bytes (slow for big models on CPU).",
)


def main(argv):
    del argv
    config = load_config(_CONFIG)
    import jax

    from diffjax import experiment
    from diffjax.models.summary import model_summary

    model = experiment.build_model(config)
    channels = experiment.model_input_channels(config)  # an inpainting model's too
    batch = _BATCH.value or config.train.batch_size
    summary = model_summary(
        model,
        image_size=config.data.image_size,
        channels=channels,
        text_len=config.data.max_text_len,
        batch_size=batch,
        compile_memory=_COMPILE_MEMORY.value,
    )
    summary.update(
        model=config.model.name,
        dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
        input_shape=[config.data.image_size, config.data.image_size, channels],
        backend=jax.default_backend(),
    )
    print(json.dumps(summary, sort_keys=True))


def entry() -> None:
    """Console-script entry point (`diffjax-inspect-model`)."""
    run(main)
