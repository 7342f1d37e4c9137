"""Inverts images to the noise that regenerates them (DDIM / DPM-Solver++(2M) inversion).

The command itself is `diffjax.cli.invert` (also installed as `diffjax-invert`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.invert import entry

if __name__ == "__main__":
    entry()
