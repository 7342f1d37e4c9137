"""Prints one JSON object describing a config's model: parameters, forward cost, memory.

The command itself is `diffjax.cli.inspect_model` (also installed as `diffjax-inspect-model`);
see its docstring or `--help` for the flags.
"""

from diffjax.cli.inspect_model import entry

if __name__ == "__main__":
    entry()
