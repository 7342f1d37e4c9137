"""LoRA files of Stable Diffusion (diffusers/peft and kohya-ss layouts) <-> diffjax LoRA trees.

    pipe = load_pipeline("stable-diffusion-v1-5")
    styled = apply_lora_files(pipe, [("style.safetensors", 0.8), ("subject", 1.0)])
    gen = PretrainedGenerator(styled, num_steps=20)          # W + sum_i s_i * dW_i
    write_lora("out/", {"unet": tree, "text_encoder": tree_te}, scale=alpha / r)

A file holds, per target module of the U-Net ("unet") and the CLIP text encoder
("text_encoder"), a down and an up matrix (torch layout: down [r, in] or [r, in, kh, kw],
up [out, r] or [out, r, 1, 1]) and optionally an alpha; the module's weight becomes
`W + user_scale * (alpha / r) * up @ down`, with alpha / r taken as 1 when the file gives
no alpha (diffusers' rule: alpha = r). The key layouts read:

  * diffusers / peft (what `save_lora_weights` writes): `unet.<module>.lora_A.weight` (down),
    `.lora_B.weight` (up), text encoder `text_encoder.[text_model.]<module>...`; alpha from
    a `<module>.alpha` key or from the peft config diffusers stores in the safetensors
    header (`lora_adapter_metadata`: `<component>.lora_alpha`, `.alpha_pattern`,
    `.use_rslora` -> alpha / sqrt(r));
  * older diffusers: `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.*`,
    attention-processor names (`attn1.processor.to_q_lora.down.weight` -> `attn1.to_q`,
    `to_out_lora` -> `to_out.0`; text encoder `to_q_lora` -> `q_proj`), and keys without
    the component prefix (`text_model.*` is the text encoder, the rest the U-Net);
  * kohya-ss: `lora_unet_<module with "_" for ".">.lora_down.weight` / `.lora_up.weight` /
    `.alpha`, `lora_te_<module>` for the text encoder (with or without `text_model_`),
    matched against the model's own module names.

Module names are the Flax param paths of the mirror-named ports (`sd_unet`, `clip_text`),
i.e. the PyTorch module names. A key that is none of these (DoRA scales, LoHa/LoKr
factors, bias terms, an SDXL second text encoder) or a module the model lacks is refused
with one `LoRAFileError` naming them all. Pickles (`.bin`, `.pt`, ...) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from diffjax.finetune import lora
from diffjax.pretrained import safetensors_io

COMPONENTS = ("unet", "text_encoder")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers: the peft configs, "<component>.<field>"
_TEXT_PREFIX = "text_model."
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Suffixes of the diffusers / peft layouts (after ".processor." is dropped).
_PARTS = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
# Attention-processor LoRA names of old diffusers files: `<attn>.to_q_lora.down.weight`.
_PROCESSOR = re.compile(
    r"^(?P<attn>.+)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down\.weight|up\.weight|alpha)$"
)
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNSUPPORTED_HINT = (
    "diffjax reads LoRA down/up weights and alphas of the U-Net and the text encoder in the "
    "diffusers/peft and kohya-ss layouts; DoRA, LoHa/LoKr/LoCon factors, bias terms and "
    "SDXL's second text encoder are not supported"
)


class LoRAFileError(lora.LoRAError):
    """A LoRA file diffjax cannot read or apply: names every offending key or module."""


# ----------------------------------------------------------------------------- reading


def lora_file(path: str) -> str:
    """The safetensors file behind `path` (a file, or a directory holding
    `pytorch_lora_weights.safetensors` or exactly one `*.safetensors`).

    Raises:
      LoRAFileError: a missing path, a pickle, or a directory without one weights file.
    """
    path = os.path.expanduser(path)
    hint = (
        "diffjax reads safetensors only (pickles run code on load and need torch); convert "
        'once with `python -c "import torch, safetensors.torch as st; st.save_file(torch.load('
        "'IN.bin', weights_only=True), 'OUT.safetensors')\"`."
    )
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if WEIGHT_NAME in names:
            return os.path.join(path, WEIGHT_NAME)
        found = [n for n in names if n.endswith(".safetensors")]
        if len(found) == 1:
            return os.path.join(path, found[0])
        pickles = [n for n in names if n.endswith(safetensors_io.PICKLE_SUFFIXES)]
        if not found and pickles:
            raise LoRAFileError(f"--lora={path} holds PyTorch pickles {pickles}: {hint}")
        raise LoRAFileError(
            f"--lora={path} is a directory without {WEIGHT_NAME}"
            + (f" and with several .safetensors files {found}: name one" if found else "")
            + "."
        )
    if path.endswith(safetensors_io.PICKLE_SUFFIXES):
        raise LoRAFileError(f"--lora={path} is a PyTorch pickle: {hint}")
    if not os.path.isfile(path):
        raise LoRAFileError(
            f"--lora={path} does not exist; give a LoRA .safetensors file or the directory "
            f"diffusers saved it to (holding {WEIGHT_NAME})."
        )
    return path


def _read(file: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(file, framework="numpy") as f:
            header = dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise LoRAFileError(f"cannot read {file} as safetensors: {e}") from e
    return safetensors_io.read_tensors(file), header


def _peft_configs(header: Mapping[str, str], file: str) -> dict[str, dict]:
    """{component: peft LoraConfig fields} from diffusers' `lora_adapter_metadata`."""
    raw = header.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise LoRAFileError(f"{file}: its {_METADATA_KEY} header is not JSON: {e}") from e
    if not isinstance(flat, dict):
        raise LoRAFileError(f"{file}: its {_METADATA_KEY} header is not a JSON object.")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        if comp in COMPONENTS and field:
            out.setdefault(comp, {})[field] = value
    return out


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """peft's `rank_pattern`/`alpha_pattern` lookup: the first pattern matching the end of
    the module name (at a "." boundary)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component, module as written, part) of a diffusers/peft key, or None."""
    comp, rest = None, key
    for c in COMPONENTS:
        if key.startswith(c + "."):
            comp, rest = c, key[len(c) + 1 :]
            break
    if comp is None:  # old prefix-less files
        comp = "text_encoder" if key.startswith(_TEXT_PREFIX) else "unet"
    rest = rest.replace(".processor.", ".")
    m = _PROCESSOR.match(rest)
    if m:
        names = _PROCESSOR_TEXT if comp == "text_encoder" else _PROCESSOR_UNET
        return comp, f"{m['attn']}.{names[m['proj']]}", m["part"].split(".")[0]
    found = next(((s, p) for s, p in _PARTS if rest.endswith(s)), None)
    if found is None:
        return None
    stem, part = rest[: -len(found[0])], found[1]
    if part == "alpha":  # `<module>.alpha` or `<module>.lora.alpha`
        stem = stem.removesuffix(".lora").removesuffix(".lora_linear_layer")
    return (comp, stem, part) if stem else None


def _kohya_index(modules: Sequence[str], text: bool) -> dict[str, str | None]:
    """{kohya name (module with "_" for "."): module}; None marks an ambiguous name."""
    index: dict[str, str | None] = {}
    for m in modules:
        names = {m.replace(".", "_")}
        if text and m.startswith(_TEXT_PREFIX):
            names.add(m[len(_TEXT_PREFIX) :].replace(".", "_"))
        for n in names:
            index[n] = m if index.get(n, m) == m else None
    return index


def read_lora(
    path: str, kernels: Mapping[str, Mapping[str, tuple]]
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]:
    """Reads a LoRA file into torch-layout tensors with their scale (alpha / r).

    Args:
      path: a `.safetensors` file, or a directory holding `pytorch_lora_weights.safetensors`.
      kernels: {component ("unet" | "text_encoder"): `lora.kernel_modules(its params)`}:
        the modules the model has (kohya names are matched against them).

    Returns:
      {component: {module: (down, up, scale)}}: float32 numpy down [r, in] (conv:
      [r, in, kh, kw]) and up [out, r] (conv: [out, r, 1, 1]); the delta of the torch
      weight is `scale * up @ down`.

    Raises:
      LoRAFileError: naming every key not understood, every module the model lacks or
        whose shapes do not fit, every module missing its down or up half.
    """
    file = lora_file(path)
    tensors, header = _read(file)
    configs = _peft_configs(header, file)
    kohya = {c: _kohya_index(sorted(kernels.get(c, {})), c == "text_encoder") for c in COMPONENTS}
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown, ambiguous = [], []
    for key, value in tensors.items():
        for prefix, comp in _KOHYA_PREFIXES.items():
            name, _, suffix = key.partition(".")
            if key.startswith(prefix) and suffix in _KOHYA_PARTS:
                short = name[len(prefix) :]
                module = kohya[comp].get(short, short)  # unmatched: reported as missing
                if module is None:
                    ambiguous.append(key)
                    module = short
                parsed = (comp, module, _KOHYA_PARTS[suffix])
                break
        else:
            parsed = None if key.startswith("lora_") else _diffusers_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        comp, module, part = parsed
        written = module  # the name peft's alpha_pattern matches
        if comp == "text_encoder" and not module.startswith(_TEXT_PREFIX):
            # transformers 5 names the text encoder's modules without `text_model.`.
            module = _TEXT_PREFIX + module
        entry = parts.setdefault((comp, module), {"written": written})
        if part in entry:
            unknown.append(f"{key} (a second {part} of {comp}.{module})")
        entry[part] = value

    problems = []
    if unknown:
        problems.append(f"keys not understood ({_UNSUPPORTED_HINT}): {_listing(unknown)}")
    if ambiguous:
        problems.append(f"kohya names that fit several modules: {_listing(ambiguous)}")
    half = sorted(f"{c}.{m}" for (c, m), e in parts.items() if "down" not in e or "up" not in e)
    if half:
        problems.append(f"modules without both a down and an up weight: {_listing(half)}")
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}
    for (comp, module), e in sorted(parts.items()):
        if "down" in e and "up" in e:
            scale = _scale(e, configs.get(comp, {}), f"{comp}.{module}", problems)
            out.setdefault(comp, {})[module] = (e["down"], e["up"], scale)
    for comp, modules in out.items():
        if comp not in kernels:
            problems.append(f"{len(modules)} {comp} modules, but this pipeline has no {comp}")
            continue
        missing = sorted(set(modules) - set(kernels[comp]))
        if missing:
            hint = ""
            if any(re.search(r"input_blocks|middle_block|output_blocks", m) for m in missing):
                hint = " (LDM/SGM block names, e.g. an SDXL LoRA: not mapped)"
            problems.append(f"{comp} modules the model lacks{hint}: {_listing(missing)}")
            continue
        try:
            lora.from_torch(modules, kernels[comp])
        except lora.LoRAError as e:
            problems.append(f"{comp}: {e}")
    if problems:
        raise LoRAFileError(f"{file}: " + "; ".join(problems))
    if not out:
        raise LoRAFileError(f"{file} holds no LoRA weights.")
    return out


def _scale(entry: Mapping[str, Any], config: Mapping[str, Any], name: str, problems) -> float:
    """alpha / r of one module: its alpha key, else the peft config, else 1."""
    rank = int(entry["down"].shape[0])
    if "alpha" in entry:
        return float(np.asarray(entry["alpha"]).reshape(-1)[0]) / rank
    if not config:
        return 1.0
    if config.get("use_dora"):
        problems.append(f"{name}: a DoRA adapter (use_dora), which diffjax does not apply")
    written = entry["written"]
    alpha = _pattern_value(config.get("alpha_pattern"), written, config.get("lora_alpha", rank))
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(alpha) / root


def _listing(items: Sequence[str], n: int = 10) -> str:
    items = list(items)
    more = f" ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------- writing


def write_lora(out_dir: str, trees: Mapping[str, Mapping[str, Any]], scale: float) -> str:
    """Writes LoRA trees as `out_dir/pytorch_lora_weights.safetensors` in diffusers' layout.

    `unet.<module>.lora_A.weight` = down, `.lora_B.weight` = up with `scale` folded in (and
    no alpha: loaders take alpha = r), so `pipe.load_lora_weights(out_dir)` in diffusers
    adds `scale * A @ B` to each module, as `lora.merge(params, tree, scale)` does.

    Args:
      out_dir: the directory to write (created if needed).
      trees: {"unet": LoRA tree of the sd_unet, "text_encoder": tree of clip_text (optional)}.
      scale: the LoRA's scale (alpha / r of its training).

    Returns:
      The path of the written file.

    Raises:
      LoRAFileError: an unknown component, or nothing to write.
    """
    bad = sorted(set(trees) - set(COMPONENTS))
    if bad:
        raise LoRAFileError(f"write_lora: components {bad} are not one of {list(COMPONENTS)}.")
    tensors = {}
    for comp in COMPONENTS:
        for module, (down, up) in lora.to_torch(trees.get(comp) or {}, scale).items():
            tensors[f"{comp}.{module}.lora_A.weight"] = down
            tensors[f"{comp}.{module}.lora_B.weight"] = up
    if not tensors:
        raise LoRAFileError("write_lora: the LoRA trees are empty; nothing to write.")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, WEIGHT_NAME)
    safetensors_io.write_tensors(tensors, path)
    return path


# ----------------------------------------------------------------------------- applying


def pair_scales(files: Sequence[str] | None, scales: Sequence[float] | None):
    """[(file, scale)] from `--lora` and `--lora_scale` flags: no scale = 1.0, one scale =
    for every file, else one per file.

    Raises:
      ValueError: a count of scales that is neither 0, 1 nor the number of files.
    """
    files, scales = list(files or []), list(scales or [])
    if scales and not files:
        raise ValueError("--lora_scale needs --lora=FILE.")
    if len(scales) in (0, 1):
        return [(f, scales[0] if scales else 1.0) for f in files]
    if len(scales) != len(files):
        raise ValueError(
            f"Give one --lora_scale for all --lora files or one per file: got {len(files)} "
            f"files and {len(scales)} scales."
        )
    return list(zip(files, scales, strict=True))


def apply_lora_files(pipe: Any, files: Sequence[tuple[str, float]]) -> Any:
    """A copy of a Stable Diffusion `Pipeline` with LoRA files merged into its U-Net and
    text encoder params: `W + sum_i scale_i * (alpha_i / r_i) * dW_i`.

    Args:
      pipe: a `pipeline.Pipeline` of a StableDiffusionPipeline (sd_unet + CLIP).
      files: [(LoRA file or directory, user scale)], applied in turn (deltas add).

    Returns:
      A new `Pipeline`; `pipe` and the files on disk are not changed.

    Raises:
      LoRAFileError: a pipeline that is not Stable Diffusion, or a file `read_lora` refuses.
    """
    if pipe.kind != "text":
        raise LoRAFileError(
            f"--lora applies to Stable Diffusion pipelines (a U-Net and a CLIP text encoder); "
            f"{pipe.path} is a {pipe.class_name}."
        )
    components = {"unet": pipe.denoiser, "text_encoder": pipe.text_encoder}
    kernels = {c: lora.kernel_modules(comp.params) for c, comp in components.items()}
    params = {c: comp.params for c, comp in components.items()}
    for path, user_scale in files:
        for comp, modules in read_lora(path, kernels).items():
            scaled = {m: (d, u, s * float(user_scale)) for m, (d, u, s) in modules.items()}
            tree = lora.from_torch(scaled, kernels[comp])
            params[comp] = lora.merge(params[comp], tree, 1.0)
    return dataclasses.replace(
        pipe,
        denoiser=dataclasses.replace(pipe.denoiser, params=params["unet"]),
        text_encoder=dataclasses.replace(pipe.text_encoder, params=params["text_encoder"]),
    )


def describe_files(files: Sequence[tuple[str, float]]) -> str:
    """One line for logs: the LoRA files and their scales."""
    return ", ".join(f"{os.path.basename(os.path.normpath(f))} x{s:g}" for f, s in files)
