# syntax=docker/dockerfile:1.7
# wanlite CPU image: orchestrator, fetch, validate, round-trip, export, register, and
# every step of the tiny preset. Build from the repository root:
#   docker build -f containers/cpu.Dockerfile -t wanlite-cpu:0.1.0 .
# Torch comes from PyTorch's CPU wheel index: the PyPI wheel for Linux bundles
# several GB of CUDA libraries that a CPU step never loads.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1

RUN python -m venv /opt/venv \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin wanlite

WORKDIR /opt/wanlite

# Dependencies first, from pyproject + constraints only: editing the source does
# not invalidate this layer, changing a pin does.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu --constraint constraints.txt torch \
 && pip install --constraint constraints.txt --requirement /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the source; --no-deps because every dependency is already pinned above.
COPY wanlite ./wanlite
COPY flows ./flows
COPY prefect.yaml README.md ./
COPY infra ./infra
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps .

USER 10001:10001
ENV HOME=/home/wanlite \
    WANLITE_CACHE=/home/wanlite/.cache/wanlite

CMD ["wanlite", "--help"]
