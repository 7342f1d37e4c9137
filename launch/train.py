"""Trains a diffusion model.

The command itself is `diffjax.cli.train` (also installed as `diffjax-train`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.train import entry

if __name__ == "__main__":
    entry()
