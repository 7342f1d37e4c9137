"""Converts pytorch-fid's Inception weights (.pth) to safetensors for diffjax.

The command itself is `diffjax.cli.convert_inception` (also installed as `diffjax-convert-inception`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.convert_inception import entry

if __name__ == "__main__":
    entry()
