"""`wanlite download`: put a registered model's ComfyUI file into a ComfyUI install."""

from __future__ import annotations

import argparse
import json



def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download a registered model version into ComfyUI/models/diffusion_models/",
        description=(
            "Resolve models:/NAME@ALIAS (or models:/NAME/VERSION) in the MLflow registry, download its "
            "ComfyUI .safetensors file, verify its sha256 against the one recorded at registration, and "
            "place it in <ComfyUI>/models/diffusion_models/ (renamed into place: never a partial file). A "
            "different file already there is never overwritten silently: pass --force to replace it. The "
            "version's ComfyUI workflow (Load Diffusion Model -> ModelSamplingSD3 with the model's shift -> "
            "KSampler with its steps and CFG) goes to <ComfyUI>/user/default/workflows/."
        ),
    )
    parser.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION, e.g. models:/wanlite-tiny@champion")
    parser.add_argument("--comfyui", required=True, help="path to the ComfyUI install (holds models/ and comfy/)")
    parser.add_argument("--force", action="store_true", help="replace a different file of the same name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wanlite.download import download

    report = download(args.model, args.comfyui, tracking_uri=args.tracking_uri, force=args.force)
    print(json.dumps(report, indent=2))
    return 0
