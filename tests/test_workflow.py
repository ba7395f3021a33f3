"""The ComfyUI workflow beside every export: ComfyUI's own format, the model's own sampling settings.

ComfyUI cannot be installed here, so the structure is checked against Comfy-Org's
published workflows (PyPI `comfyui-workflow-templates-json`): every node class
we use appears there with the same inputs and the same number of widget values.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from wanlite.sampling import Sampling
from wanlite.workflow import build_workflow, workflow_settings

FOLDED = Sampling(steps=40, shift=12.0, guidance=1.0, negative_prompt=False, sampler="unipc")
FEW = Sampling(steps=4, shift=12.0, guidance=1.0, negative_prompt=False, sampler="euler", sigmas=(1.0, 0.9, 0.7, 0.4))
CHAIN = ["UNETLoader", "ModelSamplingSD3", "CLIPLoader", "EmptyHunyuanLatentVideo", "VAELoader", "VAEDecode",
         "SaveImage", "CLIPTextEncode"]  # fmt: skip


def _templates() -> dict[str, list[dict[str, Any]]]:
    """Every node of Comfy-Org's UI-format templates, by class name."""
    root = resources.files("comfyui_workflow_templates_json") / "templates"
    nodes: dict[str, list[dict[str, Any]]] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            for node in data["nodes"]:
                if isinstance(node, dict) and "type" in node:
                    nodes.setdefault(node["type"], []).append(node)
    return nodes


@pytest.fixture(scope="module")
def templates() -> dict[str, list[dict[str, Any]]]:
    return _templates()


def _check_against_templates(workflow: dict[str, Any], templates: dict[str, list[dict[str, Any]]]) -> None:
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind == "ManualSigmas":  # stock (comfy_extras/nodes_custom_sampler.py) but in no template
            assert [i["name"] for i in node["inputs"]] == [] and len(node["widgets_values"]) == 1
            continue
        assert kind in templates, f"{kind} is not a node class of Comfy-Org's templates"
        matching = [
            t for t in templates[kind]
            if [i["name"] for i in t.get("inputs", []) if i.get("link") is not None or "widget" not in i]
            == [i["name"] for i in node["inputs"]]
            and len(t.get("widgets_values") or []) == len(node["widgets_values"])
        ]  # fmt: skip
        assert matching, f"{kind}: inputs {[i['name'] for i in node['inputs']]} / {node['widgets_values']} match no template"


def _check_links(workflow: dict[str, Any]) -> None:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == kind
    unconnected = [(n["type"], i["name"]) for n in workflow["nodes"] for i in n["inputs"] if i["link"] is None]
    assert not unconnected, f"inputs left unconnected: {unconnected}"
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])


def test_workflow_matches_comfyui_templates_and_the_model_sampling(templates) -> None:
    wf = build_workflow("wanlite-1024.safetensors", FOLDED, size=1024)
    _check_against_templates(wf, templates)
    _check_links(wf)
    kinds = [n["type"] for n in wf["nodes"]]
    assert set(CHAIN + ["KSampler"]) == set(kinds)
    assert workflow_settings(wf) == {"shift": 12.0, "steps": 40, "cfg": 1.0, "sampler": "uni_pc_bh2"}
    by_type = {n["type"]: n["widgets_values"] for n in wf["nodes"]}
    assert by_type["UNETLoader"][0] == "wanlite-1024.safetensors"
    assert by_type["CLIPLoader"][1] == "wan"
    assert by_type["EmptyHunyuanLatentVideo"] == [1024, 1024, 1, 1], "one frame: an image"
    # The format version and top-level keys of the templates' UI format.
    assert wf["version"] == 0.4 and {"nodes", "links", "groups", "config", "extra", "last_node_id"} <= set(wf)


def test_explicit_sigmas_use_the_stock_custom_sampler_chain(templates) -> None:
    wf = build_workflow("wanlite-tiny.safetensors", FEW, size=64)
    _check_against_templates(wf, templates)
    _check_links(wf)
    kinds = {n["type"] for n in wf["nodes"]}
    assert {"ManualSigmas", "KSamplerSelect", "SamplerCustom"} <= kinds and "KSampler" not in kinds
    settings = workflow_settings(wf)
    assert settings == {"shift": 12.0, "steps": 4, "cfg": 1.0, "sampler": "euler", "sigmas": [1.0, 0.9, 0.7, 0.4]}


def test_cfg_models_get_wans_negative_prompt(templates) -> None:
    from wanlite.prompts import NEGATIVE_PROMPT

    cfg = Sampling(steps=40, shift=12.0, guidance=3.0, negative_prompt=True, sampler="unipc")
    wf = build_workflow("m.safetensors", cfg, size=1024)
    texts = {n.get("title"): n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CLIPTextEncode"}
    assert texts["CLIP Text Encode (Negative Prompt)"] == NEGATIVE_PROMPT
    assert workflow_settings(wf)["cfg"] == 3.0
    folded = build_workflow("m.safetensors", FOLDED, size=1024)
    texts = {n.get("title"): n["widgets_values"][0] for n in folded["nodes"] if n["type"] == "CLIPTextEncode"}
    assert texts["CLIP Text Encode (Negative Prompt)"] == ""


def test_the_check_catches_a_wrong_widget_count(templates) -> None:
    wf = build_workflow("m.safetensors", FOLDED, size=64)
    sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"] = sampler["widgets_values"][:-1]  # denoise dropped: ComfyUI would misread every widget
    with pytest.raises(AssertionError, match="KSampler"):
        _check_against_templates(wf, templates)


def test_export_writes_the_workflow_beside_the_file(ship_student: Path, tmp_path: Path) -> None:
    from wanlite.export import export_student
    from wanlite.sampling import load_sampling

    report = export_student(ship_student, tmp_path / "out", dtype="fp32")
    workflow = json.loads(Path(report["workflow"]).read_text())
    recorded = load_sampling(ship_student)
    assert Path(report["workflow"]).parent == Path(report["path"]).parent
    assert workflow_settings(workflow) == {"shift": recorded.shift, "steps": recorded.steps,
                                           "cfg": recorded.guidance, "sampler": "uni_pc_bh2"}  # fmt: skip
