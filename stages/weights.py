"""Reading checkpoints and copying them into modules, with errors that name what does not fit.

Every model in stages/ loads through these two functions, so a missing file, a corrupt file, a
partial checkpoint or a mis-shaped tensor is reported the same way everywhere.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

SHOWN_KEYS = 5  # how many offending keys an error names before summarising the rest


class WeightsError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def _name_some(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" (and {len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def _read_one_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure means an unreadable or corrupt file
        raise WeightsError(f"cannot read weights file {path}: {type(error).__name__}: {error}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a `.safetensors` file, a sharded set through its `.safetensors.index.json`, or a
    `.pth`/`.pt`/`.bin` torch state dict (with `weights_only=True`)."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weights path {path} is a folder, not a weights file")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.name.endswith(".index.json"):
        try:
            weight_map: dict[str, str] = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise WeightsError(f"cannot read shard index {path}: {error}") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (path.parent / name).is_file()]
        if missing:
            raise WeightsError(f"shard index {path} names missing files: {_name_some(missing)}")
        state: dict[str, torch.Tensor] = {}
        for name in shard_names:
            state.update(_read_one_file(path.parent / name))
        absent = set(weight_map) - set(state)
        if absent:
            raise WeightsError(f"shards of {path} lack keys their index lists: {_name_some(absent)}")
        return state
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        raise WeightsError(
            f"unknown weights file type {path.name!r}: expected .safetensors, "
            ".safetensors.index.json, .pth, .pt or .bin"
        )
    return _read_one_file(path)


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copies `state_dict` into `module` strictly: every parameter and buffer of the module must be
    present with its shape and a floating dtype where the module's is floating, and no key may be
    left over. Floating tensors are cast to the module's dtype. `source` names the checkpoint in
    errors."""
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    mis_shaped = [
        f"{key} (expected {tuple(expected[key].shape)}, found {tuple(state_dict[key].shape)})"
        for key in sorted(set(expected) & set(state_dict))
        if expected[key].shape != state_dict[key].shape
    ]
    if mis_shaped:
        problems.append(f"mis-shaped keys: {_name_some(mis_shaped)}")
    wrong_dtype = [
        f"{key} (expected a floating dtype, found {state_dict[key].dtype})"
        for key in sorted(set(expected) & set(state_dict))
        if expected[key].is_floating_point() and not state_dict[key].is_floating_point()
    ]
    if wrong_dtype:
        problems.append(f"wrong dtypes: {_name_some(wrong_dtype)}")
    if problems:
        raise WeightsError(f"weights {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)


RANDOM_INIT_SEED = 0  # random weights are seeded so that a run without checkpoints repeats exactly

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_or_init(
    path: str,
    load: Callable[[str], nn.Module],
    make_random: Callable[[], nn.Module],
    what: str,
    config_key: str,
    warnings: list[str],
) -> nn.Module:
    """`load(path)`, or, when `path` is empty, `make_random()` under a fixed seed with a loud
    warning appended to `warnings` (the cascade puts them in the log and the manifest). A relative
    `path` is resolved by `shipped_weights_path`."""
    if path:
        return load(shipped_weights_path(path))
    message = f"{what} has RANDOM weights ({config_key} is empty): its output is noise, not a model's"
    log.warning("WARNING: %s", message)
    warnings.append(message)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return make_random()


REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (and string `metadata`) as a safetensors file, atomically (temp + rename).
    Tensors that share storage (tied weights) are each written in full."""
    from safetensors.torch import save

    path = Path(path)
    seen: set[int] = set()
    plain = {}
    for key, value in tensors.items():
        value = value.detach()
        pointer = value.untyped_storage().data_ptr()
        plain[key] = value.clone() if pointer in seen else value.contiguous()
        seen.add(pointer)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(save(plain, metadata))
    temporary.replace(path)


def shipped_weights_path(path: str) -> str:
    """Where a configured weights path points: a relative path that does not exist from the working
    directory is taken from the repository root, so the configs' paths of the project's shipped
    weights (weights/...) work from any working directory; "" stays "" (random init)."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(REPOSITORY_ROOT / path)
