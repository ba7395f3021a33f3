"""Experiment tracking (MLflow, rank 0 only), image grids, and the FLOP model behind the MFU estimate.

Only rank 0 talks to MLflow: one run per training run, reopened by id on
resume so a killed-and-resumed job is one continuous curve. System metrics
(CPU, memory, GPU when pynvml is present) are sampled by MLflow itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from PIL import Image

from wanlite.config import WanArch
from wanlite.distill.options import DEFAULT_EXPERIMENT
from wanlite.mlflow_uri import ensure_experiment, prepare_tracking, redact_text, redact_uri
from wanlite.pipeline import TEXT_LEN

log = logging.getLogger(__name__)

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring: the MFU denominator.

H100/H200 SXM figures; an H100 PCIe peaks at 756, so pass `--peak-tflops` there
(or measure it with benchmarks/gpu.py).
"""


def tracking_uri(explicit: str | None = None) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else a local SQLite file (the ./mlruns file store is retired)."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path.cwd() / ".wanlite" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class Tracker:
    """An MLflow run on rank 0; every method is a no-op on the other ranks."""

    def __init__(self, enabled: bool, uri: str | None, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.enabled = enabled
        self.uri = tracking_uri(uri) if enabled else None
        self.experiment = experiment
        self.run_id: str | None = None

    def start(self, run_name: str, params: dict[str, Any], run_id: str | None = None) -> str | None:
        """Open (or, with run_id, reopen) the run; params are logged only on a fresh run."""
        if not self.enabled:
            return None
        import mlflow

        prepare_tracking(self.uri)  # seconds, not MLflow's minutes of retries, before any training
        mlflow.set_tracking_uri(self.uri)
        ensure_experiment(mlflow.MlflowClient(self.uri), self.experiment, local_artifact_location(self.uri))
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, log_system_metrics=True)
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        log.info("MLflow run %s at %s (experiment %s)", self.run_id, redact_uri(self.uri), self.experiment)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics(metrics, step=step)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_image(image, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id is not None:
            import mlflow

            mlflow.end_run(status=status)
            self.run_id = None


def local_artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite database (MLflow would default to ./mlruns in the working directory).

    A relative database path (`sqlite:///mlflow.db`) is resolved against the
    working directory once, here, so the location is an absolute URI.
    """
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides (and proxies) its own artifact store
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def _param(value: Any) -> str:
    """MLflow params are strings of at most 6000 characters, never holding a credential."""
    return redact_text(str(value))[:6000]


def image_grid(rows: list[torch.Tensor]) -> Image.Image:
    """Rows of images [B, 3, H, W] in [0, 1] (e.g. teacher row, student row) as one RGB picture."""
    if not rows or any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"image_grid: expected equally shaped rows, found {[tuple(r.shape) for r in rows]}")
    canvas = rearrange(torch.stack(rows), "r b c h w -> (r h) (b w) c")
    return Image.fromarray((canvas.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


GRID_MIN_WIDTH = 512
"""Grids narrower than this are enlarged (nearest neighbour, whole factors) so a person can judge them."""


def viewable(image: Image.Image, min_width: int = GRID_MIN_WIDTH) -> Image.Image:
    """`image` enlarged by a whole factor to at least `min_width` pixels wide (tiny presets sample 64 px)."""
    factor = -(-min_width // image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


# --- FLOPs ---------------------------------------------------------------------------


def wan_forward_flops(arch: WanArch, tokens: int, text_len: int = TEXT_LEN) -> float:
    """Matmul FLOPs of one Wan transformer forward on one sample (2 per multiply-add).

    Counts every Linear, the self-attention (tokens^2) and cross-attention
    (tokens x 512) products, the text embedding over the padded 512 tokens and
    the per-block cross-attention K/V projections of the text. Elementwise work
    (norms, modulation, RoPE) is ignored, as MFU conventions do.
    """
    d, f, n, L = arch.dim, arch.ffn_dim, tokens, text_len
    per_block = (
        4 * 2 * n * d * d  # self-attention q, k, v, o
        + 2 * 2 * n * n * d  # q k^T and attn @ v
        + 2 * 2 * n * d * d  # cross-attention q, o
        + 2 * 2 * L * d * d  # cross-attention k, v over the text
        + 2 * 2 * n * L * d  # cross-attention products
        + 2 * 2 * n * d * f  # FFN
    )
    patch = arch.in_dim * arch.patch_volume
    embed = 2 * n * d * patch + 2 * L * (arch.text_dim * d + d * d) + 2 * n * d * arch.out_dim * arch.patch_volume
    return float(arch.num_layers * per_block + embed)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where MFU is meaningless (CPU, unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    log.warning("no bf16 peak known for %s: pass --peak-tflops to get an MFU estimate", name)
    return None
