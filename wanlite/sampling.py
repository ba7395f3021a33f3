"""How a model must be sampled, recorded with the model itself.

A student distilled on CFG-guided targets already contains the guidance: sampling
it with CFG again (and Wan's negative prompt) applies guidance twice. A
few-step student only works on the sigma schedule it was trained for. Neither
fact is visible in the weights or in diffusers' `config.json`, so every student
carries a `Sampling` record:

- in its diffusers folder as `wanlite_sampling.json` (a file stock
  `from_pretrained` ignores),
- in the exported `.safetensors` header under `HEADER_KEY` (a JSON string),
- in the registered MLflow version's tags,

and `generate`, `evaluate`, the training grids and the ComfyUI workflow read it
instead of global defaults.

Vocabulary: `sigmas` are the actual noise levels sigma in (0, 1] visited by the
sampler, already shifted, one per step, in decreasing order; the terminal 0 is
implied (diffusers' flow schedulers and ComfyUI's SIGMAS append it). When
`sigmas` is given, `shift` is recorded for reference but not applied again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wanlite.config import GUIDANCE_LOW, SAMPLE_SHIFT, SAMPLE_STEPS, ConfigError

HEADER_KEY = "wanlite_sampling"
"""Key of the JSON string in an exported file's safetensors header (and the MLflow tag prefix)."""

FILENAME = "wanlite_sampling.json"
"""The record's file inside a student's diffusers folder."""

SAMPLERS = {"unipc": "uni_pc_bh2", "euler": "euler"}
"""Our sampler names -> ComfyUI's KSampler `sampler_name`.

`unipc`: diffusers' `UniPCMultistepScheduler` on flow sigmas (order 2, bh2), the
official Wan 2.2 solver; `euler`: diffusers' `FlowMatchEulerDiscreteScheduler`
(what few-step students and explicit sigmas use).
"""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a model was trained and evaluated with."""

    steps: int
    """Transformer steps per image."""
    shift: float
    """Flow shift s: sigma' = s*sigma / (1 + (s-1)*sigma) (Wan 2.2 T2V: 12)."""
    guidance: float
    """CFG scale; 1.0 when guidance is folded into the model (or it is CFG-free)."""
    negative_prompt: bool
    """Whether the CFG pass uses Wan's negative prompt (`wanlite.prompts.NEGATIVE_PROMPT`) rather than
    the empty prompt; always False at guidance 1, where there is no second pass."""
    sampler: str
    """A key of `SAMPLERS`."""
    sigmas: tuple[float, ...] | None = None
    """Explicit sigmas when the schedule is not a stock shifted one (few-step students)."""

    def __post_init__(self) -> None:
        _validate(asdict(self), "sampling")

    @property
    def uses_cfg(self) -> bool:
        """True when sampling runs a second (negative / unconditional) pass per step."""
        return self.guidance != 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sigmas"] = list(self.sigmas) if self.sigmas is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "sampling") -> Sampling:
        """Validate every field; a wrong one raises ConfigError naming `source` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        _validate(data, source)
        sigmas = data.get("sigmas")
        return cls(
            steps=int(data["steps"]),
            shift=float(data["shift"]),
            guidance=float(data["guidance"]),
            negative_prompt=bool(data["negative_prompt"]),
            sampler=data["sampler"],
            sigmas=tuple(float(x) for x in sigmas) if sigmas is not None else None,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "sampling") -> Sampling:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{source}: expected a JSON object of sampling settings ({err})") from None
        return cls.from_dict(data, source)

    def overridden(self, **changes: Any) -> tuple[Sampling, list[str]]:
        """A copy with the non-None `changes` applied, and 'field: old -> new' for each that differs.

        Commands pass their flags here so that a report can say which of the
        model's settings a user overrode.
        """
        data = self.to_dict()
        notes = []
        for name, value in changes.items():
            if name not in data:
                raise ConfigError(f"sampling override: unknown field {name!r}; accepted: {', '.join(data)}")
            if value is None:
                continue
            value = list(value) if isinstance(value, tuple) else value
            if value != data[name]:
                notes.append(f"{name}: {data[name]} -> {value}")
                data[name] = value
        if changes.get("negative_prompt") is None:
            # The negative prompt follows guidance unless it was set too: a CFG
            # override on a folded model gets Wan's negative prompt, guidance 1 none.
            wanted = data["guidance"] != 1.0 and (data["negative_prompt"] or self.guidance == 1.0)
            if wanted != data["negative_prompt"]:
                notes.append(f"negative_prompt: {data['negative_prompt']} -> {wanted} (follows guidance)")
                data["negative_prompt"] = wanted
        if changes.get("steps") is not None and data["sigmas"] is not None and len(data["sigmas"]) != data["steps"]:
            raise ConfigError(
                f"sampling override: steps {data['steps']} does not fit the model's {len(data['sigmas'])} explicit sigmas"
            )
        return Sampling.from_dict(data, "sampling override"), notes


_FIELDS = {
    "steps": "a positive integer",
    "shift": "a positive finite number",
    "guidance": "a finite number >= 1",
    "negative_prompt": "true or false",
    "sampler": f"one of {', '.join(SAMPLERS)}",
    "sigmas": "null or a list of `steps` decreasing numbers in (0, 1]",
}


def _validate(data: dict[str, Any], source: str) -> None:
    """Raise ConfigError naming the first field that is missing, unknown or out of range."""
    missing = [k for k in _FIELDS if k not in data and k != "sigmas"]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}; expected fields {', '.join(_FIELDS)}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected fields {', '.join(_FIELDS)}")

    def bad(field: str) -> ConfigError:
        return ConfigError(f"{source}: {field} expected {_FIELDS[field]}, found {data.get(field)!r}")

    steps, shift, guidance = data["steps"], data["shift"], data["guidance"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad("steps")
    if not _number(shift) or shift <= 0:
        raise bad("shift")
    if not _number(guidance) or guidance < 1:
        raise bad("guidance")
    if not isinstance(data["negative_prompt"], bool):
        raise bad("negative_prompt")
    if data["negative_prompt"] and guidance == 1:
        raise ConfigError(
            f"{source}: negative_prompt true contradicts guidance 1: at guidance 1 there is no negative pass"
        )
    if data["sampler"] not in SAMPLERS:
        raise bad("sampler")
    sigmas = data.get("sigmas")
    if sigmas is not None:
        if not isinstance(sigmas, (list, tuple)) or len(sigmas) != steps or not all(_number(x) for x in sigmas):
            raise bad("sigmas")
        if not all(0 < x <= 1 for x in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise bad("sigmas")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --- where it is stored ---------------------------------------------------------------------


def save_sampling(folder: str | Path, s: Sampling) -> Path:
    """Write `folder/wanlite_sampling.json` (beside `config.json`; stock `from_pretrained` ignores it)."""
    path = Path(folder) / FILENAME
    path.write_text(json.dumps(s.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_sampling(folder: str | Path) -> Sampling | None:
    """The folder's record, or None for a folder written before records existed."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return None
    return Sampling.from_json(path.read_text(), str(path))


def from_header(metadata: dict[str, str] | None, source: str = "export header") -> Sampling | None:
    """The record in a safetensors header's metadata, or None when it has none."""
    if not metadata or HEADER_KEY not in metadata:
        return None
    return Sampling.from_json(metadata[HEADER_KEY], f"{source} {HEADER_KEY}")


def to_tags(s: Sampling) -> dict[str, str]:
    """MLflow tags (`wanlite_sampling` = the JSON, plus one readable tag per field)."""
    tags = {HEADER_KEY: s.to_json()}
    for name, value in s.to_dict().items():
        if value is not None:
            tags[f"{HEADER_KEY}.{name}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return tags


def from_tags(tags: dict[str, str], source: str = "model version tags") -> Sampling | None:
    """The record in a registered version's tags, or None when it has none."""
    if HEADER_KEY not in tags:
        return None
    return Sampling.from_json(tags[HEADER_KEY], f"{source} {HEADER_KEY}")


# --- the stock settings -------------------------------------------------------------------


def student_sampling(*, guided: bool, steps: int = SAMPLE_STEPS, shift: float = SAMPLE_SHIFT) -> Sampling:
    """A student distilled with the stock objective on the UniPC schedule.

    `guided` (the DAG's default, `RunSpec.guided`): the targets were the
    teacher's CFG-guided velocities, so guidance is folded in: sample at
    guidance 1 with no negative prompt. Otherwise the student learned the
    conditional velocity and needs the teacher's low-noise CFG and negative
    prompt.
    """
    if guided:
        return Sampling(steps=steps, shift=shift, guidance=1.0, negative_prompt=False, sampler="unipc")
    return Sampling(steps=steps, shift=shift, guidance=GUIDANCE_LOW, negative_prompt=True, sampler="unipc")


def sampling_for_run(spec: Any) -> Sampling:
    """The stock student settings for a `RunSpec` (resolved: `sample_steps` filled in)."""
    steps = spec.sample_steps if spec.sample_steps is not None else SAMPLE_STEPS
    return student_sampling(guided=spec.guided, steps=steps)


def teacher_sampling(steps: int = SAMPLE_STEPS) -> Sampling:
    """The Wan 2.2 teacher's sampler as one record: UniPC, shift 12, CFG with the negative prompt.

    The teacher has two experts with their own scales (`GUIDANCE_HIGH` 4.0
    high-noise, `GUIDANCE_LOW` 3.0 low-noise); `guidance` here is the
    low-noise expert's.
    """
    return Sampling(steps=steps, shift=SAMPLE_SHIFT, guidance=GUIDANCE_LOW, negative_prompt=True, sampler="unipc")
