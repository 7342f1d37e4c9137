"""Evaluates a checkpoint: generates samples and computes the configured metrics.

The command itself is `diffjax.cli.evaluate` (also installed as `diffjax-evaluate`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.evaluate import entry

if __name__ == "__main__":
    entry()
