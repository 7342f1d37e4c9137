"""Computes FID statistics (mu [2048], sigma [2048, 2048]) the way pytorch-fid does.

    python launch/fid_stats.py --images=samples.npz --inception_weights=inception.safetensors \
        --out=stats.npz [--batch_size=200]
    python launch/fid_stats.py --images=DIR_OF_PNGS ...
    python launch/fid_stats.py --dataset=digits --split=train --image_size=8 --channels=1 ...

`--images` is an .npz with `images` uint8 [N, H, W, C] (launch/sample.py's output) or a
directory of images (bmp/jpg/jpeg/pgm/png/ppm/tif/tiff/webp, read with Pillow and
converted to RGB, like pytorch-fid). `--dataset` reads a diffjax data source
(`diffjax.data.make_source`) instead, for reference statistics of a training set.
Grayscale is repeated to 3 channels; every image is resized to 299x299 bilinearly.
The output .npz has `mu`, `sigma` (float64, `np.cov` with ddof=1) and `num_images`,
interchangeable with pytorch-fid's `--save-stats` files.
"""

import os

from absl import flags

from diffjax.cli.common import run

_IMAGES = flags.DEFINE_string(
    "images", None, "An .npz with `images` uint8 [N,H,W,C], or a directory."
)
_DATASET = flags.DEFINE_string(
    "dataset", None, "A diffjax data source name (diffjax.data.make_source), instead of --images."
)
_DATA_NAME = flags.DEFINE_string("data_name", "", "--dataset: tfds dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "--dataset: data directory.")
_SPLIT = flags.DEFINE_string("split", "train", "--dataset: split.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "--dataset: image size H = W.")
_CHANNELS = flags.DEFINE_integer("channels", None, "--dataset: channels.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Use only the first N images.")
_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None, "Inception safetensors (launch/convert_inception.py).", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output statistics .npz.", required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 200, "Images per device call.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def image_batches():
    """(iterable of uint8 batches, number of images) for the chosen input."""
    from diffjax.eval import fid

    if (_IMAGES.value is None) == (_DATASET.value is None):
        raise ValueError("Pass exactly one of --images=(FILE.npz|DIR) or --dataset=SOURCE.")
    limit = _NUM_EXAMPLES.value
    if _IMAGES.value is not None:
        path = _IMAGES.value
        if os.path.isdir(path):
            files = fid.list_image_files(path)[:limit]
            return fid.iterate_image_files(files), len(files)
        images = fid.load_npz_images(path)[:limit]
        return images, len(images)
    if _IMAGE_SIZE.value is None or _CHANNELS.value is None:
        raise ValueError("--dataset needs --image_size and --channels (the source's shape).")
    from diffjax.data import make_source

    kwargs = {k: v for k, v in (("name", _DATA_NAME.value), ("data_dir", _DATA_DIR.value)) if v}
    source = make_source(
        _DATASET.value,
        split=_SPLIT.value,
        image_size=_IMAGE_SIZE.value,
        channels=_CHANNELS.value,
        **kwargs,
    )
    n = len(source) if limit is None else min(limit, len(source))
    return fid.iterate_source_images(source, _BATCH_SIZE.value, n), n


def main(argv):
    del argv
    import tqdm

    from diffjax.eval import fid, inception
    from diffjax.eval.stats import save_statistics

    if _BATCH_SIZE.value < 1:
        raise ValueError(f"--batch_size must be positive, got {_BATCH_SIZE.value}.")
    batches, n = image_batches()
    if n < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {n}.")
    variables = inception.load_params(_WEIGHTS.value)
    count = 0
    with tqdm.tqdm(total=n, unit="img", disable=not _PROGRESS.value) as bar:

        def progress(k: int) -> None:
            nonlocal count
            count += k
            bar.update(k)

        mu, sigma = fid.compute_statistics(batches, variables, _BATCH_SIZE.value, progress=progress)
    save_statistics(_OUT.value, mu, sigma, num_images=count)
    print(f"Wrote {_OUT.value}: mu {mu.shape}, sigma {sigma.shape} from {count} images.")


def entry() -> None:
    """Console-script entry point (`diffjax-fid-stats`)."""
    run(main)
