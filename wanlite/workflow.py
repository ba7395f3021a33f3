"""A ComfyUI workflow for an exported student, with the student's own sampling settings.

ComfyUI samples a Wan 2.1 T2V file with shift 8 and whatever CFG the user
types; a student trained at shift 12 with guidance folded in then gives wrong
images. So every export gets a workflow beside it (`<file>.workflow.json`),
in ComfyUI's UI workflow format (what "Save" writes and "Open"/drag-and-drop
reads; the layout of Comfy-Org's own `text_to_video_wan` template):

    UNETLoader -> ModelSamplingSD3(shift) -> KSampler(steps, cfg, sampler) -> VAEDecode -> SaveImage
    CLIPLoader(umt5-xxl, type wan) -> CLIPTextEncode (positive, negative) -> KSampler
    EmptyHunyuanLatentVideo(length 1) -> KSampler;  VAELoader -> VAEDecode

Node class names and widget orders are ComfyUI's (`nodes.py`,
`comfy_extras/nodes_model_advanced.py`, `nodes_hunyuan.py`,
`nodes_custom_sampler.py`) as used in the templates of the PyPI package
`comfyui-workflow-templates-json`; `tests/test_workflow.py` checks this file
against those templates. A model with explicit sigmas (a few-step student)
gets ComfyUI's stock custom-sampling chain instead of KSampler:
`ManualSigmas` (the sigmas plus the terminal 0) + `KSamplerSelect` ->
`SamplerCustom` (cfg) — the shift node is then kept for the model but the
sigmas are used as given.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanlite.prompts import NEGATIVE_PROMPT
from wanlite.sampling import SAMPLERS, Sampling

WORKFLOW_SUFFIX = ".workflow.json"
TEXT_ENCODER_FILE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
"""The umt5-xxl file name in ComfyUI's Wan templates (models/text_encoders/)."""
VAE_FILE = "wan_2.1_vae.safetensors"
"""The Wan 2.1 VAE file name in ComfyUI's Wan templates (models/vae/); Wan 2.2 A14B uses this VAE."""
DEFAULT_PROMPT = "a lighthouse on a rocky coast at sunset, detailed, photograph"
COMFY_SCHEDULER = "simple"
"""KSampler scheduler: evenly spaced steps over ModelSamplingSD3's shifted sigmas, as Wan's templates use."""


def workflow_path(export_file: str | Path) -> Path:
    """`wanlite-tiny.safetensors` -> `wanlite-tiny.workflow.json` (beside it)."""
    path = Path(export_file)
    return path.with_name(path.name.removesuffix(".safetensors") + WORKFLOW_SUFFIX)


@dataclass
class _Graph:
    """Nodes and links in ComfyUI's UI workflow vocabulary (links: [id, from, slot, to, slot, type])."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    links: list[list[Any]] = field(default_factory=list)

    def node(
        self,
        kind: str,
        pos: tuple[int, int],
        widgets: list[Any],
        inputs: list[tuple[str, str]] = (),
        outputs: list[tuple[str, str]] = (),
        title: str | None = None,
    ) -> int:
        node_id = len(self.nodes) + 1
        entry = {
            "id": node_id,
            "type": kind,
            "pos": list(pos),
            "size": [320, 60 + 26 * (len(widgets) + len(inputs))],
            "flags": {},
            "order": node_id - 1,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "slot_index": i, "links": []} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": kind},
            "widgets_values": widgets,
        }
        if title:
            entry["title"] = title
        self.nodes.append(entry)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        link_id = len(self.links) + 1
        out = self.nodes[src - 1]["outputs"][src_slot]
        slot = next(i for i, inp in enumerate(self.nodes[dst - 1]["inputs"]) if inp["name"] == dst_input)
        self.nodes[dst - 1]["inputs"][slot]["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, slot, out["type"]])


def build_workflow(
    export_name: str, sampling: Sampling, *, size: int, prompt: str = DEFAULT_PROMPT, seed: int = 0
) -> dict[str, Any]:
    """The workflow for `export_name` (a file in models/diffusion_models/) sampled the way `sampling` says."""
    g = _Graph()
    unet = g.node("UNETLoader", (0, 0), [export_name, "default"], outputs=[("MODEL", "MODEL")])
    clip = g.node("CLIPLoader", (0, 150), [TEXT_ENCODER_FILE, "wan", "default"], outputs=[("CLIP", "CLIP")])
    vae = g.node("VAELoader", (0, 320), [VAE_FILE], outputs=[("VAE", "VAE")])
    latent = g.node("EmptyHunyuanLatentVideo", (0, 440), [size, size, 1, 1], outputs=[("LATENT", "LATENT")])
    shift = g.node("ModelSamplingSD3", (380, 0), [sampling.shift], [("model", "MODEL")], [("MODEL", "MODEL")])
    positive = g.node("CLIPTextEncode", (380, 120), [prompt], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")],
                      title="CLIP Text Encode (Positive Prompt)")  # fmt: skip
    # At cfg 1 ComfyUI skips the negative pass, so its text is unused; it stays wired for a user who raises cfg.
    negative_text = NEGATIVE_PROMPT if sampling.negative_prompt else ""
    negative = g.node("CLIPTextEncode", (380, 330), [negative_text], [("clip", "CLIP")],
                      [("CONDITIONING", "CONDITIONING")], title="CLIP Text Encode (Negative Prompt)")  # fmt: skip
    g.link(unet, 0, shift, "model")
    g.link(clip, 0, positive, "clip")
    g.link(clip, 0, negative, "clip")
    conditioning = [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")]
    if sampling.sigmas is None:
        sampler = g.node(
            "KSampler", (800, 0),
            [seed, "fixed", sampling.steps, sampling.guidance, SAMPLERS[sampling.sampler], COMFY_SCHEDULER, 1.0],
            [*conditioning, ("latent_image", "LATENT")], [("LATENT", "LATENT")],
        )  # fmt: skip
    else:
        sigmas = ", ".join(f"{s:g}" for s in (*sampling.sigmas, 0.0))
        manual = g.node("ManualSigmas", (800, 330), [sigmas], outputs=[("SIGMAS", "SIGMAS")])
        select = g.node("KSamplerSelect", (800, 440), [SAMPLERS[sampling.sampler]], outputs=[("SAMPLER", "SAMPLER")])
        sampler = g.node(
            "SamplerCustom", (800, 0), [True, seed, "fixed", sampling.guidance],
            [*conditioning, ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
            [("output", "LATENT"), ("denoised_output", "LATENT")],
        )  # fmt: skip
        g.link(manual, 0, sampler, "sigmas")
        g.link(select, 0, sampler, "sampler")
    decode = g.node("VAEDecode", (1200, 0), [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")])
    save = g.node("SaveImage", (1200, 120), ["wanlite"], [("images", "IMAGE")])
    g.link(shift, 0, sampler, "model")
    g.link(positive, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    g.link(sampler, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, save, "images")
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"wanlite:{export_name}:{sampling.to_json()}")),
        "revision": 0,
        "last_node_id": len(g.nodes),
        "last_link_id": len(g.links),
        "nodes": g.nodes,
        "links": g.links,
        "groups": [],
        "config": {},
        "extra": {"wanlite_sampling": sampling.to_dict()},
        "version": 0.4,
    }


def write_workflow(export_file: str | Path, sampling: Sampling, *, size: int) -> Path:
    """Write the workflow beside `export_file`; return its path."""
    path = workflow_path(export_file)
    data = build_workflow(Path(export_file).name, sampling, size=size)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def workflow_settings(workflow: dict[str, Any]) -> dict[str, Any]:
    """Read back shift, steps, cfg, sampler (and sigmas) from a workflow this module wrote."""
    by_type = {n["type"]: n["widgets_values"] for n in workflow["nodes"]}
    settings: dict[str, Any] = {"shift": by_type["ModelSamplingSD3"][0]}
    if "KSampler" in by_type:
        _, _, steps, cfg, sampler, _, _ = by_type["KSampler"]
        settings.update(steps=steps, cfg=cfg, sampler=sampler)
    else:
        sigmas = [float(s) for s in by_type["ManualSigmas"][0].split(",")]
        settings.update(steps=len(sigmas) - 1, cfg=by_type["SamplerCustom"][3],
                        sampler=by_type["KSamplerSelect"][0], sigmas=sigmas[:-1])  # fmt: skip
    return settings
