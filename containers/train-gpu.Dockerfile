# syntax=docker/dockerfile:1.7
# wanlite GPU image: encode-prompts, teacher-data, project, distill (torchrun / FSDP2)
# and evaluate. Build from the repository root:
#   docker build -f containers/train-gpu.Dockerfile -t wanlite-train-gpu:0.1.0 .
# The PyPI torch wheel for Linux x86_64 carries its own CUDA runtime (nvidia-*
# wheels), so the base needs no CUDA toolkit; the host provides the driver
# through the NVIDIA container toolkit (device_requests / nvidia.com/gpu).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1

RUN python -m venv /opt/venv \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin wanlite

WORKDIR /opt/wanlite

# Dependencies first (see cpu.Dockerfile): only a changed pin rebuilds this layer.
# nvidia-ml-py lets MLflow's system metrics report GPU utilisation and memory.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --constraint constraints.txt --requirement /tmp/requirements.txt "nvidia-ml-py==13.615.71" \
 && rm /tmp/requirements.txt

COPY wanlite ./wanlite
COPY flows ./flows
COPY prefect.yaml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

USER 10001:10001
ENV HOME=/home/wanlite \
    WANLITE_CACHE=/home/wanlite/.cache/wanlite

# torchrun rendezvous (c10d) listens here on the first node of a multi-node job.
EXPOSE 29400
CMD ["wanlite", "--help"]
