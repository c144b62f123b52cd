"""Targets: what a backend runs in integer arithmetic, as data.

A target declares the ops it has integer kernels for (``ops``), the dtypes and their
constraints (activation dtype, symmetric / zero point 0, weight range, per-channel, bias
dtype, scale rules) and the placement conventions (Q/DQ after outputs or on inputs,
fused activations, stage-1 rewrites).  The presets are TOML files in ``presets/``; a
user's file has the same schema and starts from one of them with ``base = "..."``.

``ort-cpu`` (the default) resolves to the preset for the machine that quantizes:
``ort-cpu-x86`` (uint8 activations, reduced-range weights), ``ort-cpu-vnni`` (uint8,
full range) or ``ort-cpu-arm`` (int8, full range).  Nothing else in the quantizer reads
the CPU.
"""

from __future__ import annotations

import functools
import json
import platform
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from .spec import (
    ACTIVATION_DTYPES,
    MODES,
    WEIGHT_QMAX,
    ActivationSpec,
    ScaleRule,
    Target,
    TargetError,
    WeightSpec,
    from_mapping,
    merge,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "ACTIVATION_DTYPES",
    "ALIASES",
    "DEFAULT_TARGET",
    "MODES",
    "WEIGHT_QMAX",
    "ActivationSpec",
    "ScaleRule",
    "Target",
    "TargetError",
    "WeightSpec",
    "load_target",
    "machine_preset",
    "preset_names",
]

DEFAULT_TARGET = "ort-cpu"
ALIASES = {"npu": "tflite"}  # "ort-cpu" is resolved by machine_preset()
PRESETS = ("ort-cpu-x86", "ort-cpu-vnni", "ort-cpu-arm", "tensorrt", "tensorrt-fp8", "tflite")


def preset_names() -> tuple[str, ...]:
    """Every name ``load_target`` takes besides a file: the presets, ort-cpu and aliases."""
    return (DEFAULT_TARGET, *PRESETS, *ALIASES)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            return handle.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def machine_preset() -> str:
    """The onnxruntime CPU preset for this machine."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return "ort-cpu-arm"  # onnxruntime fuses int8 activations everywhere but x86
    flags = _cpu_flags()
    return "ort-cpu-vnni" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "ort-cpu-x86"


def _known_rewrites() -> tuple[str, ...]:
    from ..rewrites import RULES

    return tuple(RULES)


@functools.cache
def _preset_mapping(name: str) -> dict:
    text = resources.files(__package__).joinpath("presets", f"{name}.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    base = data.pop("base", None)
    return merge(_preset_mapping(base), data) if base else data


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"cannot read target file: {exc.strerror if isinstance(exc, OSError) else exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise TargetError(f"not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise TargetError("a target file must hold a table (TOML) or an object (JSON)")
    return data


def _resolve_name(name: str) -> str:
    name = ALIASES.get(name, name)
    return machine_preset() if name == DEFAULT_TARGET else name


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith((".toml", ".json")) or "/" in spec or "\\" in spec


def load_target(spec: str | Path | Target | Mapping[str, Any] | None = None) -> Target:
    """A Target from a preset name, a TOML/JSON file, a mapping of the file schema, or a
    Target (returned as is).  Errors are TargetError with one line naming the key."""
    if isinstance(spec, Target):
        return spec
    if spec is None:
        spec = DEFAULT_TARGET
    if isinstance(spec, Mapping):
        return _from_user_mapping(dict(spec), source="mapping", requested=str(spec.get("name", "custom")))
    text = str(spec)
    if isinstance(spec, Path) or _looks_like_file(text):
        path = Path(text)
        try:
            data = _read_file(path)
            data.setdefault("name", path.stem)
            return _from_user_mapping(data, source=str(path), requested=str(path))
        except TargetError as exc:
            raise TargetError(f"target file {path}: {exc}") from exc
    name = _resolve_name(text)
    if name not in PRESETS:
        hint = ""
        import difflib

        close = difflib.get_close_matches(text, preset_names(), n=1)
        if close:
            hint = f" (did you mean {close[0]}?)"
        raise TargetError(f"unknown target {text!r}{hint}: use one of {', '.join(preset_names())} "
                          "or a .toml/.json target file")
    target = from_mapping(_preset_mapping(name), known_rewrites=_known_rewrites(), source="preset")
    from dataclasses import replace

    return replace(target, requested=text)


def _from_user_mapping(data: dict, *, source: str, requested: str) -> Target:
    from dataclasses import replace

    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise TargetError(f"`base` must be a preset name, got {base!r}")
        name = _resolve_name(base)
        if name not in PRESETS:
            raise TargetError(f"`base` must be one of {', '.join(preset_names())}, got {base!r}")
        data = merge(_preset_mapping(name), data)
    target = from_mapping(data, known_rewrites=_known_rewrites(), source=source)
    return replace(target, requested=requested)


METADATA_KEY = "quantizer.target"


def record_target(model, target: Target) -> None:
    """Write the resolved target into ``model``'s metadata (a ModelProto): its name under
    ``quantizer.target`` and the full declaration as JSON under ``quantizer.target.spec``."""
    entries = {METADATA_KEY: target.name, f"{METADATA_KEY}.spec": json.dumps(target.as_dict(), sort_keys=True)}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
