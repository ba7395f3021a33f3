"""The teacher's non-transformer parts, and diffusers' `WanPipeline` around any Wan transformer(s).

Everything that samples or decodes goes through here so that the teacher data,
the training image grids, evaluation and generation all use the same text
encoder, VAE, scheduler and latent normalisation. We never hand-write a
sampler: the pipeline is stock `diffusers.WanPipeline` with the UniPC flow
scheduler configured the way the official Wan 2.2 sampler runs (shift 12,
40 steps; `transformer` = high-noise expert, `transformer_2` = low-noise).

Both teacher layouts are accepted: the native one (T5 and VAE as `.pth` state
dicts, converted on load with diffusers' / our key maps) and the diffusers one
(`text_encoder/`, `vae/`, `tokenizer/` folders).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from wanlite.checkpoint import components
from wanlite.checkpoint.layout import NATIVE_T5, NATIVE_TOKENIZER, NATIVE_VAE, detect_layout
from wanlite.config import BOUNDARY_RATIO, NUM_TRAIN_TIMESTEPS, SAMPLE_SHIFT
from wanlite.sampling import Sampling

TEXT_LEN = 512
"""Wan zero-pads T5 output to 512 tokens before `text_embedding` (cross-attention has no mask)."""


def local_path(location: str | Path) -> Path:
    """A local directory for a path or a store URI (`file://`, `s3://`: a verified local copy)."""
    text = str(location)
    if "://" not in text:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return path
    from wanlite import storage  # the store is only needed for URIs

    return storage.local_dir(text)


def load_tokenizer(teacher_dir: str | Path) -> PreTrainedTokenizerBase:
    """The umt5-xxl tokenizer shipped with the teacher (`google/umt5-xxl/` or `tokenizer/`)."""
    root = local_path(teacher_dir)
    folder = root / (NATIVE_TOKENIZER if detect_layout(root) == "native" else "tokenizer")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: expected the umt5-xxl tokenizer folder of the teacher, found nothing")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: expected the umt5-xxl tokenizer files, found an unusable folder ({err})") from None


def load_text_encoder(
    teacher_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> UMT5EncoderModel:
    """transformers' `UMT5EncoderModel` with the teacher's T5 weights, in eval mode.

    The native `.pth` is read with `weights_only=True` (never unpickle arbitrary
    objects) and memory-mapped; the model is built on the meta device and the
    converted tensors are assigned, so the 5.7B-parameter encoder is never
    allocated twice.
    """
    root = local_path(teacher_dir)
    if detect_layout(root) == "diffusers":
        model = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        return model.to(device).eval().requires_grad_(False)
    path = root / NATIVE_T5
    native = _load_pth(path)
    arch = components.T5Arch.from_native_shapes({k: tuple(v.shape) for k, v in native.items()})
    with torch.device("meta"):
        model = UMT5EncoderModel(components.t5_hf_config(arch))
    hf = components.t5_native_to_hf(native)
    missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: T5 weights do not fit UMT5EncoderModel({arch}): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_vae(teacher_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """diffusers' `AutoencoderKLWan` with the teacher's Wan 2.1 VAE weights, in eval mode."""
    root = local_path(teacher_dir)
    if detect_layout(root) == "diffusers":
        vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=dtype)
        return vae.eval().requires_grad_(False)
    path = root / NATIVE_VAE
    native = _load_pth(path)
    arch = components.VaeArch.from_native_shapes({k: tuple(v.shape) for k, v in native.items()})
    vae = AutoencoderKLWan.from_config(components.vae_diffusers_config(arch))
    try:
        vae.load_state_dict(convert_wan_vae_to_diffusers(native), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: VAE weights do not fit AutoencoderKLWan({arch}): {err}") from None
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def make_scheduler(shift: float = SAMPLE_SHIFT) -> UniPCMultistepScheduler:
    """UniPC on flow sigmas, as the official sampler: sigma' = s*sigma / (1 + (s-1)*sigma), order 2, bh2."""
    return UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
    )


def scheduler_for(sampling: Sampling) -> Any:
    """The diffusers scheduler a `Sampling` record names.

    `unipc`: `make_scheduler(shift)`. `euler`: `FlowMatchEulerDiscreteScheduler`
    with the same shift. Explicit sigmas: Euler with shift 1 (the sigmas are
    already the noise levels) and `set_timesteps` bound to them, because stock
    `WanPipeline` only ever calls `set_timesteps(num_inference_steps)`.
    """
    if sampling.sampler == "unipc":
        if sampling.sigmas is not None:
            raise ValueError("sampling: explicit sigmas need sampler 'euler', found 'unipc'")
        return make_scheduler(sampling.shift)
    if sampling.sigmas is None:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=sampling.shift)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps, sigmas=list(sampling.sigmas))
    return scheduler


def build_pipeline(
    teacher_dir: str | Path,
    transformer: WanTransformer3DModel,
    transformer_2: WanTransformer3DModel | None = None,
    *,
    shift: float = SAMPLE_SHIFT,
    sampling: Sampling | None = None,
    with_text_encoder: bool = True,
    with_vae: bool = True,
    vae: AutoencoderKLWan | None = None,
    text_dtype: torch.dtype = torch.float32,
) -> WanPipeline:
    """A `WanPipeline` around the given transformer(s), with the teacher's VAE, tokenizer and T5.

    With `transformer_2` it is the two-expert Wan 2.2 sampler (`transformer` is
    the HIGH-noise expert, used for t >= 875; pass `guidance_scale=4.0,
    guidance_scale_2=3.0` to match the official defaults). Without it the one
    model serves every timestep, which is how the student samples.
    `with_text_encoder=False` skips T5 entirely: callers then pass
    `prompt_embeds`/`negative_prompt_embeds` (see `pad_embeddings`).
    `with_vae=False` leaves the VAE out too: such a pipeline can only return
    `output_type="latent"` (decode with `decode_latents`), which lets ranks that
    only take part in a sharded model's forward skip loading it. `sampling`
    (a student's record) picks the scheduler and replaces `shift`; callers
    still pass its steps and guidance to the call (`sampling_call_kwargs`).
    """
    root = local_path(teacher_dir)
    return WanPipeline(
        tokenizer=load_tokenizer(root) if with_text_encoder else None,
        text_encoder=load_text_encoder(root, dtype=text_dtype) if with_text_encoder else None,
        vae=vae if vae is not None or not with_vae else load_vae(root),
        scheduler=scheduler_for(sampling) if sampling is not None else make_scheduler(shift),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=BOUNDARY_RATIO if transformer_2 is not None else None,
    )


def sampling_call_kwargs(sampling: Sampling) -> dict[str, Any]:
    """`WanPipeline.__call__` arguments a record fixes: steps and guidance (1: no CFG pass)."""
    return {"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance}


# --- latent space ------------------------------------------------------------------------


def latent_stats(vae: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the VAE latents, shaped [1, z, 1, 1, 1] for 5-D latents."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_images(vae: AutoencoderKLWan, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> normalised latents [B, 16, 1, H/8, W/8] (the posterior mean).

    The model lives in the normalised space `(mu - mean) / std`, exactly what
    the official `Wan2_1_VAE.encode` returns; diffusers leaves it to callers.
    """
    param = next(vae.parameters())
    video = images.to(device=param.device, dtype=param.dtype).unsqueeze(2)
    mu = vae.encode(video).latent_dist.mean.float()
    mean, std = latent_stats(vae)
    return (mu - mean.to(mu.device)) / std.to(mu.device)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, 1, h, w] -> images [B, 3, 8h, 8w] in [0, 1]."""
    param = next(vae.parameters())
    mean, std = latent_stats(vae)
    raw = latents.float().cpu() * std + mean
    video = vae.decode(raw.to(device=param.device, dtype=param.dtype)).sample
    return ((video[:, :, 0].float().clamp(-1, 1) + 1) / 2).cpu()


def pad_embeddings(embeds: list[torch.Tensor], length: int = TEXT_LEN) -> torch.Tensor:
    """Trimmed T5 outputs [L_i, D] -> [B, length, D], zero-padded as Wan and `WanPipeline` do."""
    if not embeds:
        raise ValueError("pad_embeddings: expected at least one embedding, found none")
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    for i, e in enumerate(embeds):
        if e.shape[0] > length:
            raise ValueError(f"pad_embeddings: embedding {i} has {e.shape[0]} tokens, more than {length}")
        out[i, : e.shape[0]] = e
    return out


# --- helpers -----------------------------------------------------------------------------


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, tensors only (`weights_only=True`), memory-mapped."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a torch state dict file, found nothing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a corrupt or unsafe file
        raise ValueError(f"{path}: not a loadable tensors-only state dict ({err})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. `encoder.embed_tokens.weight` = `shared.weight`)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied
