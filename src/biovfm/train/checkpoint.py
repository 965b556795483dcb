"""Training state on disk: written atomically, loaded with ``weights_only=True``, checked for provenance."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from biovfm.io import atomic_path

STATE = "state.pt"


class CheckpointMismatch(RuntimeError):
    pass


def save_state(out_dir: Path, state: dict[str, Any]) -> None:
    with atomic_path(out_dir / STATE, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)


def load_state(out_dir: Path, run_id: str, fingerprint: str) -> dict[str, Any] | None:
    """The last saved state of this run, or None. A state of another run or config is refused, naming both;
    a corrupt file is reported and training restarts from scratch."""
    path = out_dir / STATE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        print(f"[pretrain] {path}: unreadable checkpoint ({type(e).__name__}: {e}); restarting from scratch", flush=True)
        return None
    if state.get("run_id") != run_id or state.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"{path}: checkpoint of run {state.get('run_id')!r} (config {state.get('fingerprint')!r}) cannot resume "
            f"run {run_id!r} (config {fingerprint!r}); delete it to start over"
        )
    return state


def save_encoder(path: Path, encoder: torch.nn.Module, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
