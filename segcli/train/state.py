"""The resumable training state beside `last.safetensors`: optimizer, scheduler, grad scaler,
epoch and early-stopping counters, stored as safetensors (tensors) plus JSON metadata, so
resuming never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from segcli.errors import UsageError
from segcli.files import atomic_write, weights_digest

if TYPE_CHECKING:
    from segcli.checkpoint import CheckpointInfo

STATE_KEY = "segcli_training_state"


def state_path_for(checkpoint: str | Path) -> Path:
    """`run/last.safetensors` -> `run/last.state.safetensors`."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.replace(".safetensors", "") + ".state.safetensors")


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside `value` by a reference, collecting the tensors."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = value.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _int_keys(state: dict[str, Any]) -> dict[Any, Any]:
    """torch optimizers index their per-parameter state by int; JSON made them strings."""
    return {int(k) if k.isdigit() else k: v for k, v in state.items()}


def check_pair(checkpoint: Path, state: dict[str, Any], info: CheckpointInfo) -> None:
    """Refuse a checkpoint and training state that were not written together (a crash between
    the two writes, or one of the files replaced): the optimizer moments would not match the
    weights. States written before checkpoints carried a write id name the weights by digest."""
    if "weights_write_id" in state:
        paired = state["weights_write_id"] == info.write_id
    elif "weights_sha256" in state:
        paired = state["weights_sha256"] == weights_digest(checkpoint)
    else:
        paired = True
    if paired:
        return
    raise UsageError(
        f"{checkpoint} (epoch {info.epoch}) and {state_path_for(checkpoint)} (epoch "
        f"{state.get('epoch')}) are not a pair: the run stopped between their writes or one was "
        "replaced; resume is refused. Evaluate or predict with the checkpoint, or start a new run"
    )


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "state", tensors)
    metadata = {STATE_KEY: json.dumps(skeleton)}
    atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_training_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    if not path.is_file():
        raise UsageError(
            f"{path}: training state not found; `resume` needs the last.safetensors of a run "
            "folder with its last.state.safetensors beside it"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            skeleton = json.loads((handle.metadata() or {})[STATE_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise UsageError(f"{path}: unreadable training state ({type(error).__name__})") from None
    state = _join(skeleton, tensors)
    optimizer = state["optimizer"]
    optimizer["state"] = _int_keys(optimizer["state"])
    return state
