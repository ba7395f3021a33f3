# syntax=docker/dockerfile:1.7
# MLflow tracking server for infra/compose.yaml: the pinned mlflow plus the
# Postgres driver (backend store) and boto3 (proxied artifacts on MinIO/S3),
# which the bare `mlflow` package does not bring.
#   docker build -f containers/mlflow.Dockerfile -t wanlite-mlflow:3.17.2 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mlflow

# The same pins as the rest of wanlite (mlflow, boto3, ...), so server and
# clients speak the same version.
COPY constraints.txt /tmp/constraints.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /tmp/constraints.txt mlflow boto3 "psycopg2-binary==2.9.13" \
 && rm /tmp/constraints.txt

USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
