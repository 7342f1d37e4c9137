"""Encodes a dataset to VAE latents (and captions to text embeddings) for latent training.

The command itself is `diffjax.cli.encode_latents` (also installed as
`diffjax-encode-latents`); see its docstring or `--help` for the flags.
"""

from diffjax.cli.encode_latents import entry

if __name__ == "__main__":
    entry()
