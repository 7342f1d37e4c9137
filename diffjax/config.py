"""Every config field diffjax knows, each with a one-line comment.

Experiment files (`configs/*.py`) import `get_base_config()`, override what they need,
and return the result from their own `get_config(arg=None)`. Fields with no sensible
default use `config_dict.placeholder(type)` so they can still be set from the command
line. Each field reaches the code that uses it, or `diffjax.experiment.check_config`
refuses it with a message naming it (a schedule's field set under another schedule).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

# Fields earlier versions wrote into config.json that nothing reads any more; dropped
# when an old run directory is read back (`diffjax.experiment.upgrade_config`).
REMOVED_FIELDS = ("data.shuffle_buffer", "sample.batch_size")


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds params, data order and every per-step random draw.
    c.task = "diffusion"  # diffusion (a denoiser) | autoencoder (model.name='autoencoder_kl').

    # ---------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.source = "digits"  # digits | digits_text | tfds | folder | latents.
    d.name = ""  # tfds dataset name (e.g. "cifar10"); unused by other sources.
    d.data_dir = ""  # tfds data_dir, image-folder root, or latents file.
    d.split = "train"  # Split to train on.
    d.image_size = 8  # Spatial size H = W of the model input.
    d.channels = 1  # Channels of the model input.
    d.num_classes = 10  # Class count for conditioning; 0 = unconditional.
    d.random_flip = False  # Random horizontal flip augmentation.
    d.skip_corrupt = False  # Skip (and count) unreadable images instead of failing.
    d.worker_count = 0  # grain worker processes (0 = in the main process).
    d.max_text_len = 16  # Token length of captions for text-conditioned configs.
    d.caption_template = ""  # Caption template for sources that make captions from labels.
    d.tokenizer = ""  # Caption tokenizer: "" = built-in words; a CLIP tokenizer or pipeline dir.
    d.num_examples = 0  # Train on the first N records of data.source only; 0 = all.
    # data.mix: "SOURCE:LOCATION:FRACTION[,...]" (diffjax/data/mix.py), e.g. a synthetic set
    # from launch/make_dataset.py as "folder:/d/synth:0.5"; data.source gets the rest.
    d.mix = ""  # Other sources mixed into the stream with fixed fractions; "" = none.

    # ---------------------------------------------------------------- latent diffusion
    # latent.vae: the AutoencoderKL the latents were encoded with (launch/encode_latents.py),
    # a diffusers VAE directory or a pipeline directory with vae/; sample grids, sample.py,
    # evaluation and exports decode through it, and a resume with other weights is refused.
    # With image data (not data.source='latents') the train step encodes each batch with it.
    c.latent = ml_collections.ConfigDict()
    c.latent.vae = ""  # VAE directory of a latent model; "" = a pixel-space model.
    c.latent.sample_posterior = True  # Image data: train on posterior draws (False: the mean).

    # ---------------------------------------------------------------- frozen text encoder
    # text.encoder: a CLIP text encoder (transformers' CLIPTextModel directory, or a pipeline
    # with text_encoder/) that turns data.tokenizer's caption ids into the model's context in
    # the train step and at sampling; frozen, recorded by hash, checked on resume.
    c.text = ml_collections.ConfigDict()
    c.text.encoder = ""  # Frozen text encoder directory; "" = none.

    # ---------------------------------------------------------------- fine-tuning
    # pretrained: a diffusers Stable Diffusion pipeline directory. The denoiser starts from
    # its unet/ weights and takes its architecture (model.name/kwargs), schedule and
    # prediction (diffusion.*), latent.vae, text.encoder and data.tokenizer, .max_text_len,
    # .channels (and .image_size when 0). `diffjax.pretrained.stage.apply_pretrained`.
    c.pretrained = ""  # Pipeline directory to fine-tune; "" = train from scratch.
    # base_workdir: a diffjax run whose EMA params are the base of a LoRA (or the start of a
    # full fine-tune); its model, diffusion, data shape, latent and text fields are taken.
    c.base_workdir = ""  # Run directory to fine-tune; "" = none.

    # ---------------------------------------------------------------- DreamBooth
    # data.source='dreambooth': instance images captioned with an identifier prompt, plus
    # (prior preservation) class images the base generates once into class_dir.
    c.dreambooth = ml_collections.ConfigDict()
    c.dreambooth.instance_dir = ""  # Folder of the subject's images.
    c.dreambooth.instance_prompt = ""  # Their caption, with the identifier ("a photo of sks dog").
    c.dreambooth.class_prompt = ""  # Prior prompt; "" = every class caption of the base's data.
    c.dreambooth.num_class_images = 200  # Class images the base generates (cached, reused).
    c.dreambooth.prior_loss_weight = 1.0  # Weight of the class images' loss (0 = no prior).
    c.dreambooth.class_dir = ""  # Where they are cached; "" = WORKDIR/class_images.

    # ---------------------------------------------------------------- LoRA
    # lora.rank > 0 trains only low-rank deltas W + (alpha / rank) * A @ B of the target
    # modules over the frozen base (config.pretrained or config.base_workdir); only the LoRA
    # is in the optimizer, EMA and checkpoints (`diffjax.finetune.lora`).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # LoRA rank r; 0 = train the whole model.
    c.lora.alpha = 0.0  # The delta's scale is alpha / rank; 0 = alpha = rank (scale 1).
    c.lora.targets = ""  # Regex over module names; "" = the model's attention q/k/v/out.
    c.lora.dropout = 0.0  # Dropout on the LoRA's input in training (0: merged into the weights).
    c.lora.text_encoder = False  # Also train a LoRA on the frozen text encoder (text.encoder).

    # ---------------------------------------------------------------- ControlNet
    # controlnet.control != "" trains a ControlNet (a trainable copy of the encoder half,
    # joined to the frozen base through zero-initialised convs) on control images computed
    # per record from the training images (or read from ROOT/control/ for "given"); the base
    # is config.pretrained or config.base_workdir, frozen. Only the ControlNet is in the
    # optimizer, EMA and checkpoints (`diffjax.models.controlnet`).
    c.controlnet = n = ml_collections.ConfigDict()
    n.control = ""  # "" = no ControlNet; edges (Canny) | sobel | tile | mask | given.
    n.conditioning_channels = 0  # Control image channels; 0 = the output image's (set at start).
    n.control_downsample = 0  # Output image size / model input size; 0 = set at start
    # (1 for pixel models, latent.vae's factor for latent ones).
    n.canny_low = 100  # edges: cv2.Canny's lower threshold (on uint8 luminance).
    n.canny_high = 200  # edges: cv2.Canny's upper threshold.
    n.tile_factor = 8  # tile: area-downsample by this, then cubic-upsample back.
    n.mask_threshold = 0.5  # mask: luminance in [0, 1] above this -> 1.
    n.embedding_channels = ()  # Condition-embedding widths; () = the model family's default.
    n.depth = 0  # dit: control blocks (copies of the first N blocks); 0 = depth // 2.
    n.conditioning_scale = 1.0  # Sampling: the residuals' scale.
    n.guess_mode = False  # Sampling: residuals scaled 0.1 -> 1 from shallow to deep; no
    # control on the unconditional branch of classifier-free guidance.
    n.guidance_start = 0.0  # Sampling: fraction of the steps where control starts applying.
    n.guidance_end = 1.0  # Sampling: ... and where it stops.

    # ---------------------------------------------------------------- inpainting
    # inpainting.enabled trains an inpainting model: each record gets a random mask (1 =
    # regenerate; `diffjax.data.masks`) and the network sees concat([x_t, mask, masked
    # image]) on the channel axis: C + 1 + C channels in, C out (Stable Diffusion
    # inpainting's 9-channel layout for latent models, whose mask is downsampled to the
    # latent grid and whose masked image latent.vae encodes in the step). Label/caption
    # dropout keeps the mask and masked image; sampling without a mask generates whole images.
    c.inpainting = p = ml_collections.ConfigDict()
    p.enabled = False  # Train an inpainting model (set by a 9-channel SD-inpainting pretrained).
    p.masks = "box:0.3,brush:0.4,outpaint:0.15,full:0.15"  # Mask kinds and weights (normalised).
    p.min_size = 0.1  # Smallest box side, border span or stroke segment (fraction of the side).
    p.max_size = 0.5  # Largest box side, border span or stroke segment (fraction of the side).
    p.max_strokes = 4  # brush: 1 to this many strokes per mask.
    p.brush_width = 0.2  # brush: the thickest stroke (fraction of the side, at least 1 pixel).

    # ---------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.name = "unet"  # Registry name: unet | dit.
    m.kwargs = ml_collections.ConfigDict()  # Passed verbatim to the module constructor.
    m.dtype = "float32"  # Compute dtype (float32 | bfloat16); params stay float32.
    m.remat_policy = "none"  # none | full | dots_saveable | ... (jax.checkpoint policy).

    # ---------------------------------------------------------------- diffusion
    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "discrete_vp"  # discrete_vp | continuous_vp | edm | flow.
    f.beta_schedule = "linear"  # discrete_vp: linear | scaled_linear | cosine.
    f.beta_start = 1e-4  # discrete_vp: first beta.
    f.beta_end = 0.02  # discrete_vp: last beta.
    f.num_timesteps = 1000  # discrete_vp: number of training timesteps.
    f.zero_terminal_snr = False  # discrete_vp: rescale betas so the last step has SNR 0.
    f.beta_min = 0.1  # continuous_vp: beta(0).
    f.beta_max = 20.0  # continuous_vp: beta(1).
    f.t_min = 1e-3  # continuous_vp: last time the sampler evaluates the model at.
    f.train_t_min = 1e-5  # continuous_vp: training draws t ~ U[train_t_min, 1].
    f.sigma_min = 0.002  # edm, flow: smallest sigma/alpha of the step placements.
    f.sigma_max = 80.0  # edm, flow: largest sigma/alpha of the step placements.
    f.prediction = "epsilon"  # What the network predicts: epsilon | x0 | v | flow.
    f.loss_weighting = "eps_mse"  # eps_mse | snr | min_snr | edm | uniform.
    f.min_snr_gamma = 5.0  # min_snr weighting: gamma.
    f.sigma_data = 0.5  # edm schedule or edm weighting: data standard deviation.
    f.p_mean = -1.2  # edm: mean of log-sigma at training time.
    f.p_std = 1.2  # edm: std of log-sigma at training time.
    f.logit_normal_mean = 0.0  # flow: mean of the logit-normal training t.
    f.logit_normal_std = 1.0  # flow: std of the logit-normal training t.
    f.cond_dropout = 0.1  # Probability that a label/caption is replaced by the null one (CFG).
    f.clip_x0 = True  # Clip predicted x0 to [-1, 1] when sampling pixel-space models.

    # ---------------------------------------------------------------- autoencoder
    # task='autoencoder' trains diffusers' AutoencoderKL (model.kwargs are its fields); the
    # diffusion and sampler fields do not apply. Exports are diffusers VAE directories.
    c.autoencoder = a = ml_collections.ConfigDict()
    a.kl_weight = 1e-6  # Weight of the KL(posterior || N(0, I)) term (SD's VAE: 1e-6).
    a.recon_loss = "l1"  # Per-pixel reconstruction loss: l1 | l2.
    a.sample_posterior = True  # Train on decodes of a posterior draw (False: of the mean).
    a.perceptual_weight = 0.0  # Weight of the LPIPS (VGG16) term; 0 = off. Needs images >= 16x16.
    a.perceptual_weights = ""  # LPIPS safetensors from launch/convert_lpips.py (needed when on).
    a.gan_weight = 0.0  # Weight of the patch-GAN generator term; 0 = no discriminator.
    a.gan_start_step = 0  # Optimizer step at which the GAN terms (G and D) switch on.
    a.gan_loss = "hinge"  # hinge | vanilla (non-saturating) adversarial loss.
    a.gan_adaptive_weight = (
        True  # Scale the G term by taming's ||grad rec|| / ||grad G|| at conv_out.
    )
    a.disc_channels = 64  # PatchGAN width of its first conv (pix2pix's ndf).
    a.disc_layers = 3  # PatchGAN stride-2 convs (pix2pix's n_layers).

    # ---------------------------------------------------------------- training
    c.train = t = ml_collections.ConfigDict()
    t.num_steps = 1000  # Total optimizer steps.
    t.batch_size = 128  # Global batch size (all devices, all processes).
    t.grad_accum_steps = 1  # Micro-batches accumulated per optimizer step.
    t.learning_rate = 1e-3  # Peak learning rate.
    t.lr_schedule = "constant"  # constant | cosine (after warmup).
    t.warmup_steps = 100  # Linear warmup steps.
    t.weight_decay = 0.0  # AdamW decoupled weight decay.
    t.b1 = 0.9  # Adam beta1.
    t.b2 = 0.999  # Adam beta2.
    t.eps = 1e-8  # Adam epsilon.
    t.grad_clip = 1.0  # Global-norm gradient clipping (0 disables).
    t.ema_decay = 0.999  # EMA decay of the params used for sampling and export.
    t.ema_warmup = True  # Use min(decay, (1+step)/(10+step)) so early EMA tracks the params.
    t.log_every_steps = 50  # Metrics cadence (metrics.jsonl, TensorBoard, progress bar).
    t.checkpoint_every_steps = 500  # Checkpoint cadence.
    t.keep_checkpoints = 3  # How many recent checkpoints Orbax keeps.
    t.sample_every_steps = 1000  # Sample-grid cadence (0 = only at the end).
    t.skip_nonfinite = False  # Skip updates with non-finite loss/grads instead of stopping.
    t.profile_steps = 0  # Trace this many steps with jax.profiler into WORKDIR/profile (0 = off).

    # ---------------------------------------------------------------- sampling
    c.sample = s = ml_collections.ConfigDict()
    s.method = "ddim"  # Sampler name (see diffjax.diffusion.samplers.METHODS).
    s.num_steps = 50  # Solver steps.
    s.guidance = 1.0  # Classifier-free guidance scale (1 = conditional model only).
    s.guidance_rescale = 0.0  # Guidance rescale phi (Lin et al. 2023).
    s.eta = config_dict.placeholder(float)  # ddim / dpmpp_2m_sde eta (None = method default).
    s.num_images = 100  # Images in the training-time sample grid (0 = no grid).

    # ---------------------------------------------------------------- evaluation
    c.eval = e = ml_collections.ConfigDict()
    e.num_samples = 1000  # Samples generated for evaluation.
    e.batch_size = 500  # Samples generated per call.
    e.every_steps = 0  # Evaluate during training every N steps (0 = off).
    e.reference_stats = ""  # FID reference statistics (.npz with mu, sigma); "" = no FID.
    e.inception_weights = ""  # Inception safetensors for FID.
    e.digits_metrics = False  # Digits classifier accuracy + Frechet distance.
    e.memorization = False  # Nearest training images of the samples + copy fraction.
    e.memorization_features = "auto"  # auto | pixels | digits | inception (l2 space).
    e.copy_threshold = 1.0 / 3.0  # Copy: d(nearest) < this * d(second nearest).
    e.memorization_num_train = 0  # Search the first N training records (0 = all).
    e.cas = False  # Classification accuracy score (digits, class-conditional).

    # ---------------------------------------------------------------- mesh
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # Data-parallel axis size (-1 fills the remaining devices).
    c.mesh.fsdp = 1  # FSDP axis size (-1 fills the remaining devices).
    return c


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment file at `path` (what `--config=path:arg` loads).

    Lets one experiment file build on another by path (`configs/digits_text.py` on
    `configs/digits.py`) without the repository being importable as a package.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} does not exist.")
    name = "_diffjax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
