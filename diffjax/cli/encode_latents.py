"""Encodes a dataset to VAE latents (and captions to text embeddings) for latent training.

    python launch/encode_latents.py --vae=DIR --images=(FILE.npz|FOLDER|tfds:NAME|digits) --out=OUTDIR
        [--text_encoder=DIR] [--captions] [--sample --seed=0] [--batch_size=32]
        [--image_size=S] [--data_dir=TFDS_DIR --split=train] [--overwrite]

`--vae` is a diffusers pipeline directory (its vae/ is used) or an AutoencoderKL
directory (config.json + safetensors weights). `--images` is an .npz with `images`
uint8 [N, H, W, C] (optional `labels` int [N], `captions` str [N]), a folder of images
(class sub-folders give labels, a `.txt` beside an image is its caption), or
`tfds:NAME` (a prepared tfds dataset). `--image_size` resizes the shorter side and
center-crops (default: an .npz's own size, the VAE's sample_size otherwise).

Writes OUTDIR/latents.npy float32 [N, h, w, c] = scaling_factor * (mean - shift_factor)
(`--sample`: a posterior draw, reproducible from --seed whatever the batch size or
device count), labels.npy, with `--text_encoder` (a pipeline or CLIP text encoder
directory) context.npy [N, 77, D] + context_mask.npy (CLIP's last hidden state as SD
uses it; `--captions` alone stores token ids instead), and meta.json (VAE path and
sha256, factors, mode/sample and seed, shapes, source). Train on it with
`data.source='latents'`, `data.data_dir=OUTDIR`. An interrupted run continues where it
stopped when rerun with the same arguments; a finished OUTDIR is kept unless
`--overwrite`.
"""

from absl import flags

from diffjax.cli.common import run, setup_logging

_VAE = flags.DEFINE_string(
    "vae", None, "Pipeline directory (uses vae/) or AutoencoderKL directory.", required=True
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "FILE.npz (images uint8 [N,H,W,C]), an image folder, tfds:NAME, or digits[:half0|half1].",
    required=True,
)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_TEXT = flags.DEFINE_string(
    "text_encoder", None, "Pipeline or CLIP text encoder directory: encode the captions."
)
_CAPTIONS = flags.DEFINE_bool(
    "captions", False, "Keep the captions (token ids without --text_encoder)."
)
_SAMPLE = flags.DEFINE_bool("sample", False, "Draw from the posterior instead of its mode.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the posterior draw (--sample).")
_BATCH = flags.DEFINE_integer(
    "batch_size", 32, "Images per device call (rounded up to a multiple of the device count)."
)
_SIZE = flags.DEFINE_integer("image_size", None, "Resize and center-crop to this size.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data directory (tfds:NAME).")
_SPLIT = flags.DEFINE_string("split", "train", "tfds split (tfds:NAME).")
_MAX_TEXT_LEN = flags.DEFINE_integer(
    "max_text_len", 16, "Token length of --captions without --text_encoder."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace what --out already holds.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    setup_logging()
    from diffjax.pretrained import encode

    meta = encode.encode_dataset(
        _IMAGES.value,
        _OUT.value,
        vae=_VAE.value,
        text_encoder=_TEXT.value,
        captions=_CAPTIONS.value,
        sample=_SAMPLE.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        image_size=_SIZE.value,
        data_dir=_DATA_DIR.value,
        split=_SPLIT.value,
        max_text_len=_MAX_TEXT_LEN.value,
        overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value,
    )
    extras = [k for k in ("labels", "captions") if meta.get(k)]
    print(
        f"Wrote {meta['count']} latents {tuple(meta['latent_shape'])} ({meta['latents']}"
        f"{', seed ' + str(meta['seed']) if meta['seed'] is not None else ''}"
        f"{', ' + ', '.join(extras) if extras else ''}) to {_OUT.value}; train on them with "
        f"--config.data.source=latents --config.data.data_dir={_OUT.value}"
    )


def entry() -> None:
    """Console-script entry point (`diffjax-encode-latents`)."""
    run(main)
