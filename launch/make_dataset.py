"""Writes a model's samples as a dataset (image folder or tfds ArrayRecord), resumably.

The command itself is `diffjax.cli.make_dataset` (also installed as
`diffjax-make-dataset`); see its docstring or `--help` for the flags.
"""

from diffjax.cli.make_dataset import entry

if __name__ == "__main__":
    entry()
