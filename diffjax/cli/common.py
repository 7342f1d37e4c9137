"""Shared pieces of the command-line entry points: config flag, clean errors, logging.

Each command is a module of this package with a `main(argv)` and an `entry()`;
`launch/*.py` and the `diffjax-*` console scripts both call `entry()`.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags


def config_flag():
    """`--config=configs/x.py[:arg]`, locked, with `--config.a.b=v` overrides."""
    return config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config file (a Python file with get_config(arg)).",
        lock_config=True,
    )


def override_flag():
    """`--config.a.b=v` overrides without a `--config=` file (applied to a run's config).

    The flag parses against the base config, which has every field, so unknown keys
    and wrong types still fail at parse time.
    """
    from diffjax.config import get_base_config

    return config_flags.DEFINE_config_dict(
        "config", get_base_config(), "Overrides of the run's config.", lock_config=True
    )


def workdir_config(workdir: str, flag):
    """The run's config.json with every `--config.*` given on the command line applied."""
    from diffjax.rundir import load_workdir_config

    return apply_overrides(load_workdir_config(workdir), flag)


def apply_overrides(config, flag):
    """`config` with every `--config.a.b=v` given on the command line set in it."""
    for arg in sys.argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        src, dst = flag.value, config
        for key in path[:-1]:
            src, dst = src[key], dst[key]
        dst[path[-1]] = src[path[-1]]
    return config


def parse_flags(argv: list[str], command_module: str | None = None) -> list[str]:
    """absl flag parsing with one-line errors (a bad `--config.x.y=v` is named) and a
    `--help` that lists the command's own flags and exits 0."""
    if "--help" in argv[1:] or "-h" in argv[1:] or "--helpshort" in argv[1:]:
        module = sys.modules[command_module] if command_module else sys.modules["__main__"]
        sys.stdout.write((module.__doc__ or "").strip() + "\n\nFlags:\n")
        for name in (module.__name__, __name__):  # the command's flags, then --config
            text = flags.FLAGS.module_help(name)
            sys.stdout.write(text + "\n" if text else "")
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        detail = _explain_override(argv, bad) or str(e)
        sys.stderr.write(f"error: {detail} (--help lists the flags)\n")
        sys.exit(2)


def _explain_override(argv: list[str], overrides: list[str]) -> str | None:
    """Names the first override whose key does not exist, with the valid keys there."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not overrides:
        return None
    try:
        if config_arg:
            config = config_flags.config_flags._ConfigFileParser("config").parse(config_arg)  # noqa: SLF001
        else:
            from diffjax.config import get_base_config

            config = get_base_config()
    except Exception:  # noqa: BLE001 — the config file itself is broken; absl's message says why.
        return None
    for arg in overrides:
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for i, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = "config" + "".join(f".{p}" for p in path[:i])
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (
                    f"unknown config key '{'.'.join(path)}' in {arg!r}: {where} has no field "
                    f"'{key}'. Valid fields of {where}: {', '.join(valid)}."
                )
            node = node[key]
    return None


def load_config(flag):
    """The parsed config, or an error naming what is wrong with it."""
    arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), "")
    path = arg.split(":", 1)[0]
    if path and not os.path.isfile(path):
        raise FileNotFoundError(
            f"Config file {path} does not exist (from --config={arg}); configs/ holds the "
            "shipped ones, e.g. --config=configs/digits.py."
        )
    config = flag.value
    if config is None:
        raise ValueError(
            "--config is required, e.g. --config=configs/digits.py (--help lists the flags)."
        )
    return config


def run(main) -> None:
    """`app.run(main)` with clean flag errors, and user errors printed without a traceback.

    Errors that name the problem and its fix (missing files, an unusable workdir, a
    workdir of another model, corrupt checkpoints, bad values, a non-finite loss) exit 1
    with that one line; a second Ctrl-C exits 130. Set DIFFJAX_TRACEBACK=1 to see the
    traceback too.
    """
    import os

    from absl import app

    def wrapped(argv):
        from diffjax.checkpoint import CheckpointError
        from diffjax.train.hooks import NonFiniteError

        try:
            return main(argv)
        except KeyboardInterrupt:
            if os.environ.get("DIFFJAX_TRACEBACK"):
                raise
            sys.stderr.write("Interrupted; checkpoints already saved are intact.\n")
            sys.exit(130)
        except (OSError, ValueError, CheckpointError, NonFiniteError, flags.Error) as e:
            if os.environ.get("DIFFJAX_TRACEBACK"):
                raise
            sys.stderr.write(f"error: {e}\n")
            sys.exit(1)

    # absl prints the __main__ module's docstring as the usage text; the command's own
    # docstring (in this package) is the one that documents it.
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
    app.run(wrapped, flags_parser=lambda argv: parse_flags(argv, main.__module__))


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache (reruns and resumes skip compiling).

    The directory is $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/diffjax/xla;
    DIFFJAX_COMPILATION_CACHE=0 turns it off.
    """
    import os

    import jax

    if os.environ.get("DIFFJAX_COMPILATION_CACHE") == "0":
        return
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        path = os.path.join(os.path.expanduser("~"), ".cache", "diffjax", "xla")
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    enable_compilation_cache()


def read_images(path: str, flag: str) -> np.ndarray:
    """uint8 [N, H, W, C] from a .npz (`images`, as sample.py writes them) or one image
    file (PNG, JPEG ...; grayscale stays one channel)."""
    return _read_uint8(path, flag, "images", "uint8 images [N, H, W, C]", ndim=4)


def read_masks(path: str, flag: str) -> np.ndarray:
    """uint8 masks [N, H, W] (255 = regenerate, 0 = keep) from a .npz (`masks`) or one
    grayscale image file."""
    return _read_uint8(path, flag, "masks", "uint8 masks [N, H, W]", ndim=3, gray=True)


def _read_uint8(
    path: str, flag: str, key: str, what: str, *, ndim: int, gray: bool = False
) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}={path} does not exist.")
    if path.endswith(".npz"):
        with np.load(path) as f:
            if key not in f:
                raise ValueError(
                    f"{flag}={path} has no `{key}` array ({what}); it holds {sorted(f.files)}."
                )
            arr = f[key]
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                mode = "L" if gray or img.mode in ("L", "1") else "RGB"
                arr = np.asarray(img.convert(mode))[None]
        except OSError as e:
            raise ValueError(f"{flag}={path} is neither a .npz nor an image: {e}") from None
    if ndim == 4 and arr.ndim == 3:
        arr = arr[..., None]
    if ndim == 3 and arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or arr.ndim != ndim:
        raise ValueError(f"{flag}={path} must hold {what}, got {arr.dtype} {list(arr.shape)}.")
    return arr


def parse_labels(values: list[str] | None) -> list[int] | str | None:
    """`--labels=3,3,7` -> [3, 3, 7]; `--labels=none` -> "none" (the null class)."""
    if not values:
        return None
    if [v.strip().lower() for v in values] == ["none"]:
        return "none"
    bad = [v for v in values if not v.strip().lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"--labels takes class indices such as --labels=3,3,7; got {bad}.")
    return [int(v) for v in values]
