"""Draws samples from a trained run (EMA params) or an export.

The command itself is `diffjax.cli.sample` (also installed as `diffjax-sample`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.sample import entry

if __name__ == "__main__":
    entry()
