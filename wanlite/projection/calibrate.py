"""Calibration: run the teacher on noised latents and record what each unit contributes.

The statistics are the inputs of index selection (select.py):

- residual channels: energy of every block's *inputs* (the modulated self-attn
  input, the cross-attn input, the modulated FFN input, the head's modulated
  input), each site normalised to mean 1 so every layer counts equally; plus the
  raw residual stream's per-channel energy, which exposes massive activations;
- heads: energy each head writes into the residual stream, i.e. after the
  output projection and the gate (a head whose output the o-projection or the
  gate scales down matters little, whatever its attention output's norm);
- FFN neurons: the same, after the down projection and the gate;
- q/k: per-channel energy before the RMSNorm, which sets the norm rescale;
- the hidden units of the text and time embedding MLPs: the energy each unit
  writes through the MLP's second layer (their own activations, not the
  residual channel of the same index).

A second pass (`collect_norm_ratios`), once the channels are chosen, measures
how much smaller each shrunken LayerNorm's output comes out over the kept
channels than the teacher's, which project.py folds into what follows.

Timesteps follow the teacher's sampler (shift 12) and each sample is routed to
the expert that serves its timestep (t >= 875: high-noise), so the statistics
describe the whole range the student must cover. Both experts' statistics are
pooled per unit: A14B's experts are fine-tunes of one base, so head h or neuron
n is the same unit in both, whichever expert seeds the weights. Each expert is
put on the device once per pass, read one tensor at a time
(`TeacherReader.device_expert`: host memory bounded by the largest tensor), and
every batch it serves runs on it. The exception is a CPU run on an expert
larger than `HOST_RESIDENT_BYTES`: holding it would break the projection's
host-memory bound, so it is streamed (re-read per batch) instead, and the
report says so.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from wanlite.checkpoint.reader import TeacherReader
from wanlite.config import BOUNDARY_RATIO, EXPERTS, NUM_TRAIN_TIMESTEPS, SAMPLE_SHIFT, WanArch

log = logging.getLogger(__name__)

HIGH, LOW = EXPERTS

HOST_RESIDENT_BYTES = 2 * 2**30
"""On a CPU, an expert up to 2 GiB (in the calibration dtype) is loaded once; a larger one is streamed."""


def expert_for_pass(
    reader: TeacherReader, expert: str, dtype: torch.dtype, device: str | torch.device
) -> tuple[nn.Module, str]:
    """The expert to run a calibration pass on, and how it is held ("resident" or "streamed")."""
    size = reader.arch.num_params() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and size > HOST_RESIDENT_BYTES:
        return reader.streaming_expert(expert, dtype=dtype, device=device), "streamed"
    return reader.device_expert(expert, dtype=dtype, device=device), "resident"


class CalibrationError(ValueError):
    """Calibration inputs of the wrong shape; the message names the input, expected and found."""


def shift_sigma(sigma: torch.Tensor, shift: float = SAMPLE_SHIFT) -> torch.Tensor:
    """The sampler's time shift: sigma' = s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def high_noise_share(shift: float = SAMPLE_SHIFT) -> float:
    """Fraction of shifted timesteps the high-noise expert serves (sigma' >= boundary).

    Inverting the shift at the boundary b gives sigma = b / (s - (s-1) b); with
    s = 12 and b = 0.875 that is 0.368, so the high-noise expert serves 63.2%.
    """
    b = BOUNDARY_RATIO
    return 1.0 - b / (shift - (shift - 1) * b)


@dataclass(frozen=True)
class CalibrationSet:
    """Clean latents, their text context, and per-sample noise and timesteps.

    `latents` [N,16,h,w] and `context` [N,512,text_dim] are repeated
    `len(timesteps) / N` times, one timestep each.
    """

    latents: torch.Tensor
    context: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    source: str

    @property
    def num_inputs(self) -> int:
        return int(self.timesteps.numel())

    def sample_index(self) -> torch.Tensor:
        return torch.arange(self.num_inputs) % self.latents.shape[0]

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noised 5-D latents, timesteps, context) for the given input rows."""
        idx = self.sample_index()[rows]
        sigma = (self.timesteps[rows] / NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1)
        x_t = (1 - sigma) * self.latents[idx] + sigma * self.noise[rows]
        return x_t.unsqueeze(2), self.timesteps[rows], self.context[idx]

    def digest(self) -> str:
        """sha256 of everything that determines the statistics."""
        h = hashlib.sha256()
        for t in (self.latents, self.context, self.timesteps, self.noise):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def build_calibration_set(
    arch: WanArch,
    *,
    num_samples: int,
    latent_size: int,
    timesteps_per_sample: int = 2,
    latents: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    seed: int = 0,
) -> CalibrationSet:
    """Validate or synthesise calibration inputs; cheap, so it runs before any teacher I/O.

    Timesteps are stratified quantiles of the shifted-sigma distribution, so
    with two or more per sample both experts' ranges are always covered.
    Default latents and context are standard normal at a fixed seed (fine for
    a synthetic teacher; pass teacher latents and T5 embeddings for a real one).
    """
    gen = torch.Generator().manual_seed(seed)
    source = f"{'random' if latents is None else 'given'} latents, {'random' if context is None else 'given'} context"
    if timesteps_per_sample < 1:
        raise CalibrationError(f"timesteps_per_sample: expected >= 1, found {timesteps_per_sample}")
    if latents is None:
        if num_samples < 1:
            raise CalibrationError(f"calib_samples: expected >= 1, found {num_samples}")
        latents = torch.randn(num_samples, arch.in_dim, latent_size, latent_size, generator=gen)
    n = latents.shape[0] if latents.ndim == 4 else None
    _check_latents(latents, arch)
    if context is None:
        context = torch.randn(n, arch.text_len, arch.text_dim, generator=gen)
    context = _check_context(context, arch, n)
    k = timesteps_per_sample
    strata = torch.arange(k).repeat_interleave(n) + torch.rand(n * k, generator=gen)
    sigma = shift_sigma(strata / k)
    timesteps = (sigma * NUM_TRAIN_TIMESTEPS).clamp(max=NUM_TRAIN_TIMESTEPS - 1)
    noise = torch.randn(timesteps.numel(), *latents.shape[1:], generator=gen)
    return CalibrationSet(latents.float(), context.float(), timesteps, noise, source)


def _check_latents(latents: torch.Tensor, arch: WanArch) -> None:
    shape = tuple(latents.shape)
    if latents.ndim != 4 or shape[1] != arch.in_dim or shape[2] % 2 or shape[3] % 2 or shape[0] < 1:
        raise CalibrationError(
            f"calibration latents: expected [N, {arch.in_dim}, h, w] with N >= 1 and even h, w "
            f"(patch 1x2x2), found {list(shape)}"
        )


def _check_context(context: torch.Tensor, arch: WanArch, n: int) -> torch.Tensor:
    """Check [N, L <= 512, text_dim] and zero-pad to 512 tokens, as Wan's text path does."""
    shape = tuple(context.shape)
    if context.ndim != 3 or shape[0] != n or shape[2] != arch.text_dim or not 1 <= shape[1] <= arch.text_len:
        raise CalibrationError(
            f"calibration context: expected [{n}, L <= {arch.text_len}, {arch.text_dim}] (one T5 embedding "
            f"per latent), found {list(shape)}"
        )
    pad = arch.text_len - shape[1]
    return torch.nn.functional.pad(context, (0, 0, 0, pad)) if pad else context


@dataclass
class Statistics:
    """Sums over calibration tokens (float64, CPU); see the module docstring for what each measures."""

    site_energy: torch.Tensor  # [3L+1, d]: per-channel energy of each block input and the head input
    residual_energy: torch.Tensor  # [L+1, d]: raw residual stream entering each block, and the head
    head_energy: dict[str, torch.Tensor]  # "self_attn"/"cross_attn" -> [L, H]
    neuron_energy: torch.Tensor  # [L, F]
    qk_energy: dict[str, torch.Tensor]  # "self_attn.norm_q" ... -> [L, d]
    embedding_energy: dict[str, torch.Tensor]  # "text_embedding"/"time_embedding" -> [d] per hidden unit
    tokens: int = 0
    inputs_per_expert: dict[str, int] = field(default_factory=dict)
    loading: dict[str, str] = field(default_factory=dict)  # expert -> "resident" (read once) or "streamed"

    @classmethod
    def zeros(cls, arch: WanArch) -> Statistics:
        L, d, H, F = arch.num_layers, arch.dim, arch.num_heads, arch.ffn_dim
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(
            site_energy=z(3 * L + 1, d),
            residual_energy=z(L + 1, d),
            head_energy={"self_attn": z(L, H), "cross_attn": z(L, H)},
            neuron_energy=z(L, F),
            qk_energy={f"{a}.{n}": z(L, d) for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")},
            embedding_energy={"text_embedding": z(d), "time_embedding": z(d)},
        )


def route(timesteps: torch.Tensor, available: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Input rows per expert: t >= 875 to the high-noise expert, the rest to the low-noise one.

    A teacher with a single expert serves every timestep with it (logged).
    """
    high = timesteps >= BOUNDARY_RATIO * NUM_TRAIN_TIMESTEPS
    rows = {HIGH: torch.nonzero(high).flatten(), LOW: torch.nonzero(~high).flatten()}
    if set(available) >= {HIGH, LOW}:
        return {k: v for k, v in rows.items() if v.numel()}
    (only,) = available
    log.warning("teacher has only %s: it serves every calibration timestep", only)
    return {only: torch.arange(timesteps.numel())}


def collect_statistics(
    reader: TeacherReader,
    calib: CalibrationSet,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
) -> Statistics:
    """Run every calibration input through its expert and accumulate `Statistics`.

    Each expert is loaded onto `device` once (see `expert_for_pass`); `batch_size` bounds activation memory.
    """
    stats = Statistics.zeros(reader.arch)
    routes = route(calib.timesteps, reader.expert_names)
    for expert, rows in routes.items():
        stats.inputs_per_expert[expert] = int(rows.numel())
        model, stats.loading[expert] = expert_for_pass(reader, expert, dtype, device)
        handles = _attach(model, stats)
        for i in tqdm(range(0, rows.numel(), batch_size), desc=f"calibration ({expert})", unit="batch", leave=False):
            x, t, ctx = calib.inputs(rows[i : i + batch_size])
            with torch.no_grad():
                model(x.to(device, dtype), t.to(device), ctx.to(device, dtype), return_dict=False)
            stats.tokens += x.shape[0] * (x.shape[3] // 2) * (x.shape[4] // 2)
        for handle in handles:
            handle.remove()
        del model
    return stats


NORM_SITES = ("norm1", "norm2", "norm3")
"""Native names of a block's LayerNorms: norm1 before self-attn, norm2 before the FFN, norm3 (affine) before
cross-attn. diffusers calls them norm1, norm3 and norm2."""
_DIFFUSERS_NORM = {"norm1": "norm1", "norm2": "norm3", "norm3": "norm2"}


@dataclass
class NormRatios:
    """Per student layer and LayerNorm, the calibration mean over tokens of sigma_kept / sigma_all.

    A LayerNorm over the kept channels divides by their own standard deviation
    sigma_kept instead of the teacher's sigma_all; multiplying its output by
    this ratio restores the teacher's values on the kept channels (for each
    token it is exactly the least-squares factor: the means drop out because
    the kept channels' deviations from their own mean sum to zero).
    `time_embedding_mean` [d] is the mean time embedding, where the head's
    time-dependent scale is evaluated (see project.fold_norm_ratios).
    """

    blocks: dict[str, list[float]]  # native norm name -> per student layer
    head: float
    time_embedding_mean: torch.Tensor
    tokens: int

    def summary(self) -> dict:
        return {"blocks": self.blocks, "head": self.head, "tokens": self.tokens}


def collect_norm_ratios(
    reader: TeacherReader,
    calib: CalibrationSet,
    layers: tuple[int, ...],
    channels: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
) -> NormRatios:
    """Second calibration pass: sigma_kept / sigma_all at the kept blocks' LayerNorm inputs and the head's."""
    eps = reader.arch.eps
    sums = {n: torch.zeros(len(layers), dtype=torch.float64) for n in NORM_SITES}
    head, count, tokens = torch.zeros((), dtype=torch.float64), 0, 0
    kept = channels.to(device)

    def ratio_sum(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        sigma_all = (x.var(-1, unbiased=False) + eps).sqrt()
        sigma_kept = (x[..., kept].var(-1, unbiased=False) + eps).sqrt()
        return (sigma_kept / sigma_all).double().sum().cpu()

    temb_sum = torch.zeros(reader.arch.dim, dtype=torch.float64)

    def on_input(module: nn.Module, add) -> torch.utils.hooks.RemovableHandle:
        def pre(_module: nn.Module, args: tuple) -> None:  # must return None: a value would replace the input
            add(ratio_sum(args[0]))

        return module.register_forward_pre_hook(pre)

    def keep_temb(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        temb_sum.add_(out.detach().float().sum(0).double().cpu())

    for expert, rows in route(calib.timesteps, reader.expert_names).items():
        model, _ = expert_for_pass(reader, expert, dtype, device)
        handles = [
            on_input(getattr(model.blocks[layer], _DIFFUSERS_NORM[name]), sums[name][j : j + 1].add_)
            for j, layer in enumerate(layers)
            for name in NORM_SITES
        ]
        handles.append(on_input(model.norm_out, head.add_))
        handles.append(model.condition_embedder.time_embedder.register_forward_hook(keep_temb))
        for i in range(0, rows.numel(), batch_size):
            x, t, ctx = calib.inputs(rows[i : i + batch_size])
            with torch.no_grad():
                model(x.to(device, dtype), t.to(device), ctx.to(device, dtype), return_dict=False)
            tokens += x.shape[0] * (x.shape[3] // 2) * (x.shape[4] // 2)
            count += x.shape[0]
        for handle in handles:
            handle.remove()
        del model
    return NormRatios(
        blocks={n: (sums[n] / tokens).tolist() for n in NORM_SITES},
        head=float(head / tokens),
        time_embedding_mean=(temb_sum / count).float(),
        tokens=tokens,
    )


def _attach(model: nn.Module, stats: Statistics) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that add one batch's contributions to `stats` (registered after the streaming hooks)."""
    handles = []
    gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    add = lambda acc, row, value: acc[row].add_(value.detach().double().cpu())  # noqa: E731

    def hook(module: nn.Module, fn) -> None:
        def pre(_module: nn.Module, args: tuple) -> None:  # must return None: a value would replace the input
            fn(args[0])

        handles.append(module.register_forward_pre_hook(pre))

    def block_hook(i: int):
        def capture(block: nn.Module, args: tuple) -> None:
            hidden, temb = args[0], args[2]
            e = block.scale_shift_table.float() + temb.float()  # [B, 6, d]: shift, scale, gate (x2)
            gates[i] = (e[:, 2], e[:, 5])
            add(stats.residual_energy, i, hidden.float().pow(2).sum((0, 1)))

        return capture

    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(block_hook(i)))
        for site, module in enumerate((block.attn1, block.attn2, block.ffn)):
            hook(module, lambda a, r=3 * i + site: add(stats.site_energy, r, a.float().pow(2).sum((0, 1))))
        for attn_name, attn, gate_at in (("self_attn", block.attn1, 0), ("cross_attn", block.attn2, None)):
            for norm in ("norm_q", "norm_k"):
                acc = stats.qk_energy[f"{attn_name}.{norm}"]
                hook(getattr(attn, norm), lambda a, acc=acc, i=i: add(acc, i, a.float().pow(2).sum((0, 1))))
            out = attn.to_out[0]
            hook(out, lambda a, out=out, i=i, g=gate_at, n=attn_name, h=attn.heads: add(
                stats.head_energy[n], i, _head_energy(a, out.weight, h, gates[i][g] if g is not None else None)
            ))
        down = block.ffn.net[2]
        hook(down, lambda a, down=down, i=i: add(stats.neuron_energy, i, _neuron_energy(a, down.weight, gates[i][1])))
    for name, mlp in (
        ("text_embedding", model.condition_embedder.text_embedder),
        ("time_embedding", model.condition_embedder.time_embedder),
    ):
        second = mlp.linear_2
        hook(second, lambda a, second=second, name=name: stats.embedding_energy[name].add_(
            _unit_energy(a, second.weight).double().cpu()
        ))  # fmt: skip
    depth = len(model.blocks)
    hook(model.norm_out, lambda a: add(stats.residual_energy, depth, a.float().pow(2).sum((0, 1))))
    hook(model.proj_out, lambda a: add(stats.site_energy, 3 * depth, a.float().pow(2).sum((0, 1))))
    return handles


def _head_energy(heads_out: torch.Tensor, w_o: torch.Tensor, num_heads: int, gate: torch.Tensor | None) -> torch.Tensor:
    """Sum over tokens of ||gate * W_o[:, head] a_head||^2 per head: what each head writes to the residual.

    Computed through each head's 128x128 Gram matrix W_h^T diag(gate^2) W_h
    rather than by projecting every head's output to full width: the same
    number, at (dim + tokens) x 128^2 instead of tokens x dim^2 operations.
    """
    a = heads_out.float().unflatten(-1, (num_heads, -1))  # [B, T, H, k]
    w = w_o.float().unflatten(1, (num_heads, -1))  # [d, H, k]
    if gate is None:
        gram = torch.einsum("dhk,dhl->hkl", w, w)
        return (torch.einsum("bthk,hkl->bthl", a, gram) * a).sum((0, 1, 3))
    energy = torch.zeros(num_heads, device=a.device)
    for b in range(a.shape[0]):  # the gate differs per sample
        wg = w * gate[b].float().view(-1, 1, 1)
        gram = torch.einsum("dhk,dhl->hkl", wg, wg)
        energy += (torch.einsum("thk,hkl->thl", a[b], gram) * a[b]).sum((0, 2))
    return energy


def _unit_energy(act: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||W[:, n] a_n||^2 per hidden unit n: what each unit writes through `w_out`."""
    return act.float().pow(2).flatten(0, -2).sum(0) * w_out.float().pow(2).sum(0)


def _neuron_energy(act: torch.Tensor, w_down: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ||gate * W_2[:, n] g_n||^2 per neuron (rank one, so it factorises exactly)."""
    act_sq = act.float().pow(2).sum(1)  # [B, F]
    gated_col_sq = gate.float().pow(2) @ w_down.float().pow(2)  # [B, d] @ [d, F] -> [B, F]
    return (act_sq * gated_col_sq).sum(0)
