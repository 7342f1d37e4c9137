"""Pretrained diffusers / Hugging Face directories in, diffusers directories out.

Layout:
  * `safetensors_io`: weight files of a component directory (single, sharded, variants,
    fp16/bf16) -> float32 numpy; writing safetensors; reading config.json.
  * `convert`: torch state dicts <-> Flax params for the ports whose module tree
    mirrors the torch one (AutoencoderKL, SD U-Net, CLIP, T5), with errors that name
    every missing, unexpected and mis-shaped key.
  * `scheduler`: a diffusers `scheduler_config.json` <-> a diffjax schedule, sampler
    method and step grid.
  * `diffusers_dit`, `diffusers_unet2d`: diffjax's own `dit` / `unet` in diffusers'
    `DiTTransformer2DModel` / `UNet2DModel` layouts, both ways.
  * `pipeline`: a whole pipeline directory (`model_index.json`) -> loaded components
    and a sampler (`PretrainedGenerator`); `LatentDecoder`, a frozen VAE for latent runs.
  * `encode`: a dataset -> VAE latents (+ caption embeddings) on disk, what
    `launch/encode_latents.py` runs; `check_latents_meta`.
  * `frozen`: a run's frozen components (its VAE) recorded by hash and checked on resume.
"""
