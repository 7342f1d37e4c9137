"""Computes FID statistics (mu [2048], sigma [2048, 2048]) the way pytorch-fid does.

The command itself is `diffjax.cli.fid_stats` (also installed as `diffjax-fid-stats`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.fid_stats import entry

if __name__ == "__main__":
    entry()
