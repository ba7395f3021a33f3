"""Where evaluation keeps its models on the device, and how much device memory that takes.

Evaluating against Wan 2.2 A14B holds two 14.3B-parameter experts, the
5.7B-parameter T5 and the VAE beside the student. All of it in fp32 on one
device is ~137 GB of weights alone, so on CUDA evaluation places its models
differently from the CPU:

- the experts run in bf16 (what training computes the teacher in too);
- only one expert is on the device at a time: both keep a copy in pinned host
  memory and the one about to run is copied in when its forward starts, over
  the device copy of the other (`OneResident`); nothing is copied back;
- the prompts are encoded with T5 first and T5 is freed before any
  transformer reaches the device.

On the CPU the device is host memory: experts fp32, both resident, exactly as
before. Either way T5 is freed after encoding, and the report names the
placement and its computed peak device memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from wanlite.config import WanArch
from wanlite.distill.teacher_data import VAE_STRIDE
from wanlite.pipeline import TEXT_LEN

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from wanlite.checkpoint.components import T5Arch, VaeArch


TEXT_BATCH = 16
"""Prompts per T5 forward when evaluation encodes (encode-prompts' default): T5's activations follow the batch."""
PATCH_PIXELS = 16
"""One transformer token per 16 x 16 pixels: VAE stride 8 times patch 2."""
FP32 = 4
"""Activation bounds count every element as 4 bytes, so they hold for bf16 compute as well."""


@dataclass(frozen=True)
class Placement:
    """Precisions and residency of evaluation's models on one device."""

    device: torch.device
    expert_dtype: torch.dtype
    text_dtype: torch.dtype
    one_expert: bool
    """True: one expert on the device at a time, the other in host memory."""

    def describe(self) -> str:
        experts = "one resident at a time, the other in host memory" if self.one_expert else "both resident"
        return (f"{self.device.type}: experts {_name(self.expert_dtype)}, {experts}; "
                f"T5 {_name(self.text_dtype)}, freed before the experts run")  # fmt: skip

    def teacher_autocast(self) -> AbstractContextManager:
        """bf16 autocast for direct expert calls on CUDA (their inputs are fp32), as the trainer runs them."""
        if self.device.type == "cuda" and self.expert_dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def placement_for(device: str | torch.device) -> Placement:
    """CUDA: bf16 experts, one resident at a time. Anything else: fp32, both resident (as before)."""
    device = torch.device(device)
    if device.type == "cuda":
        return Placement(device, torch.bfloat16, torch.bfloat16, one_expert=True)
    return Placement(device, torch.float32, torch.float32, one_expert=False)


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


class OneResident:
    """Keeps at most one of several frozen models on `device`; the others exist only in host memory.

    Each model's tensors stay in host memory (pinned on CUDA: the copy engine
    reads pinned pages directly, pageable ones through a staging buffer); a
    forward pre-hook puts device copies of the called
    model's tensors in place after restoring the host tensors of the model
    that ran before. Restoring drops the device copies, freeing their memory
    for the next model; nothing is ever copied back.
    """

    def __init__(self, models: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.slots = [_slots(model) for model in models]
        if device.type == "cuda":
            for table, key in (slot for slots in self.slots for slot in slots):
                table[key].data = table[key].data.pin_memory()
        self.host = [[table[key] for table, key in slots] for slots in self.slots]
        self.resident: int | None = None
        for index, model in enumerate(models):
            model.register_forward_pre_hook(self._bringer(index))

    def _bringer(self, index: int) -> Callable[[nn.Module, tuple], None]:
        def bring(_module: nn.Module, _args: tuple) -> None:
            self.bring(index)

        return bring

    def bring(self, index: int) -> None:
        """Make model `index` the one on the device."""
        if self.resident == index:
            return
        if self.resident is not None:
            for (table, key), host in zip(self.slots[self.resident], self.host[self.resident]):
                table[key] = host
        for (table, key), host in zip(self.slots[index], self.host[index]):
            copy = host.detach().to(self.device, non_blocking=True)
            table[key] = nn.Parameter(copy, requires_grad=False) if isinstance(host, nn.Parameter) else copy
        self.resident = index


def _slots(model: nn.Module) -> list[tuple[dict, str]]:
    """Where each parameter and buffer of `model` lives: (`module._parameters` or `module._buffers`, name)."""
    return [(table, key) for module in model.modules() for table in (module._parameters, module._buffers)
            for key, value in table.items() if value is not None]  # fmt: skip


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


# --- device memory, computed from shapes ---------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers in their dtypes (a meta-device model works too)."""
    return sum(t.numel() * t.element_size() for _, t in _tensors(model))


def transformer_forward_bytes(config: dict, batch: int, tokens: int) -> int:
    """Upper bound on the activations of one no-grad forward of a Wan transformer (diffusers config).

    Without grad a block's temporaries are freed before the next block runs,
    so the bound is the widest moment inside one block, per token: the FFN
    holds the residual, its norm, the ffn-wide projection and its GELU
    (2 dim + 2 ffn elements); self-attention holds the residual, its norm,
    q, k, v, their RoPE temporaries, the attention and projection outputs
    and the fp32 copies of the gated residual update (fewer than 12 dim
    elements). Each sample also carries its 512 text tokens: the T5 input
    (text_dim) and the text embedding's layers and one block's cross-attention
    keys and values (4 dim). Every element counts 4 bytes. The attention
    itself is taken to be a fused kernel with O(tokens) extra memory, which
    PyTorch's SDPA picks on CUDA for bf16 at head_dim 128; its math fallback
    would add batch x heads x tokens^2 elements.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    per_token = FP32 * (2 * config["ffn_dim"] + 12 * dim)
    per_sample = tokens * per_token + FP32 * TEXT_LEN * (config["text_dim"] + 4 * dim)
    return batch * per_sample


def text_encoder_forward_bytes(config: PretrainedConfig, batch: int) -> int:
    """Upper bound on one no-grad forward of transformers' UMT5 encoder over `batch` prompts of 512 tokens.

    Per token: the residual, its norm, q, k, v, the attention output and fp32
    norm temporaries (fewer than 12 d_model elements) or the gated FFN's two
    d_ff projections and their product (3 d_ff). UMT5 attention is eager:
    per head it holds the position bias, the scores, their softmax and its
    cast (4 x 512^2 elements). Every element counts 4 bytes.
    """
    per_token = FP32 * (3 * config.d_ff + 12 * config.d_model)
    attention = FP32 * 4 * config.num_heads * TEXT_LEN**2
    return batch * (TEXT_LEN * per_token + attention)


def vae_decode_bytes(vae: nn.Module, size: int) -> int:
    """Upper bound on decoding one `size` x `size` frame with diffusers' `AutoencoderKLWan`.

    Decoding one frame, every causal convolution keeps its input in the
    decoder's frame cache until the decode ends, so the cache is the sum of
    every convolution's input, found by running the decoder on the meta
    device (shapes only, no memory); on top of it the three largest of those
    inputs stand for the tensors live at once, and the mid-block's
    single-head attention over the latent grid counts as unfused (scores,
    softmax and its output: 3 x positions^2 elements). Every element counts
    4 bytes (the VAE runs in fp32).
    """
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    with torch.device("meta"):
        replica = AutoencoderKLWan.from_config(vae.config)
    inputs: list[int] = []
    for module in replica.decoder.modules():
        if isinstance(module, WanCausalConv3d):
            module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].numel()))
    side = size // VAE_STRIDE
    with torch.no_grad():
        replica.decode(torch.zeros(1, replica.config.z_dim, 1, side, side, device="meta"))
    largest = sorted(inputs)[-3:]
    return FP32 * (sum(inputs) + sum(largest) + 3 * side**4)


@dataclass(frozen=True)
class DeviceMemory:
    """Computed device bytes of each evaluation phase: what is resident then, plus its activation bound."""

    encode: int
    sample: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.encode, self.sample, self.decode)

    def to_dict(self) -> dict[str, int]:
        return {"encode": self.encode, "sample": self.sample, "decode": self.decode, "peak": self.peak}


def encode_bytes(text_encoder: nn.Module, batch: int) -> int:
    """The encode phase: T5 alone on the device (nothing else is there yet) and one batch's forward."""
    return weight_bytes(text_encoder) + text_encoder_forward_bytes(text_encoder.config, batch)


def device_memory(
    placement: Placement,
    *,
    encode: int,
    expert: nn.Module,
    predictors: Sequence[nn.Module],
    vae: nn.Module,
    size: int,
    num_sigmas: int,
) -> DeviceMemory:
    """Peak device bytes of an evaluation, from shapes: weights resident at once + activation bounds.

    `encode`: the encode phase (`encode_bytes`); `expert`: one teacher expert
    in the placement's dtype; `predictors`: the student and the baseline,
    both kept on the device. Sampling and the velocity grid share a phase:
    the largest forward is the grid's teacher call, cond and uncond of every
    sigma in one batch (2 x num_sigmas); the pipelines run batch 1.
    """
    tokens = (size // PATCH_PIXELS) ** 2
    resident = weight_bytes(expert) * (1 if placement.one_expert else 2)
    resident += sum(weight_bytes(m) for m in predictors) + weight_bytes(vae)
    forwards = [transformer_forward_bytes(expert.config, 2 * num_sigmas, tokens)]
    forwards += [transformer_forward_bytes(m.config, num_sigmas, tokens) for m in predictors]
    return DeviceMemory(encode=encode, sample=resident + max(forwards), decode=resident + vae_decode_bytes(vae, size))



def planned_memory(
    placement: Placement,
    *,
    teacher: WanArch,
    student: WanArch,
    t5: T5Arch,
    vae: VaeArch,
    size: int,
    num_sigmas: int,
    baseline: bool,
) -> DeviceMemory:
    """`device_memory` of an evaluation given by shapes alone: every model is built on the meta device.

    The student (and the baseline, which has the student's shape) in fp32, as
    saved; the expert and T5 in the placement's dtypes; the VAE in fp32.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from wanlite.checkpoint.components import t5_hf_config, vae_diffusers_config
    from wanlite.student import cast_keeping_fp32_modules

    with torch.device("meta"):
        expert = WanTransformer3DModel.from_config(teacher.diffusers_config())
        predictors = [WanTransformer3DModel.from_config(student.diffusers_config()) for _ in range(1 + baseline)]
        text_encoder = UMT5EncoderModel(t5_hf_config(t5)).to(placement.text_dtype)
        decoder = AutoencoderKLWan.from_config(vae_diffusers_config(vae))
    cast_keeping_fp32_modules(expert, placement.expert_dtype)
    return device_memory(
        placement, encode=encode_bytes(text_encoder, TEXT_BATCH), expert=expert, predictors=predictors, vae=decoder,
        size=size, num_sigmas=num_sigmas,
    )  # fmt: skip
