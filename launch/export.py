"""Exports a run's EMA params for sampling elsewhere.

The command itself is `diffjax.cli.export` (also installed as `diffjax-export`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.export import entry

if __name__ == "__main__":
    entry()
