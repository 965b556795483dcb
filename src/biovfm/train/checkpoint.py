"""Training state on disk: written atomically, verified by digest, loaded with ``weights_only=True``.

Each save writes ``state-<step>.pt`` and then its sidecar ``state-<step>.json`` (digest, step, provenance);
a state counts only once its sidecar exists and the digest matches. The two newest states are kept, so a
corrupt newest state falls back to the previous one instead of to scratch.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from biovfm.io import atomic_path, write_json

KEEP = 2


class CheckpointMismatch(RuntimeError):
    pass


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecars(out_dir: Path) -> list[Path]:
    """Sidecars of saved states, newest first."""
    return sorted(out_dir.glob("state-*.json"), reverse=True)


def save_state(out_dir: Path, state: dict[str, Any]) -> Path:
    """Write the state for ``state['step']`` and keep the newest :data:`KEEP` complete ones."""
    out_dir = Path(out_dir)
    path = out_dir / f"state-{int(state['step']):09d}.pt"
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(state, tmp)
    meta = {"step": int(state["step"]), "run_id": state.get("run_id"), "fingerprint": state.get("fingerprint"),
            "sha256": _digest(path), "file": path.name}
    try:
        write_json(path.with_suffix(".json"), meta)
    except BaseException:  # e.g. the disk filled up: a state without its sidecar only takes space
        path.unlink(missing_ok=True)
        raise
    for old in _sidecars(out_dir)[KEEP:]:
        (out_dir / json.loads(old.read_text()).get("file", old.with_suffix(".pt").name)).unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    complete = {p.with_suffix(".pt") for p in _sidecars(out_dir)}
    for orphan in out_dir.glob("state-*.pt"):  # a state whose sidecar never got written (killed mid-save)
        if orphan not in complete:
            orphan.unlink(missing_ok=True)
    return path


def load_state(out_dir: Path, run_id: str, fingerprint: str, log=print) -> dict[str, Any] | None:
    """The newest good state of this run, or None.

    A state of another run or config is refused, naming both; a corrupt state (digest mismatch,
    unreadable) is reported and the previous one is tried, then scratch."""
    out_dir = Path(out_dir)
    bad = 0
    for side in _sidecars(out_dir):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            log(f"[pretrain] {side}: unreadable checkpoint record ({e}); trying the previous checkpoint")
            bad += 1
            continue
        if meta.get("run_id") != run_id or meta.get("fingerprint") != fingerprint:
            raise CheckpointMismatch(
                f"{side.with_suffix('.pt')}: checkpoint of run {meta.get('run_id')!r} (config {meta.get('fingerprint')!r}) "
                f"cannot resume run {run_id!r} (config {fingerprint!r}); delete {out_dir}/state-* to start over"
            )
        path = out_dir / meta.get("file", side.with_suffix(".pt").name)
        try:
            if not path.is_file() or _digest(path) != meta.get("sha256"):
                raise ValueError("missing or digest mismatch")
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            log(f"[pretrain] {path}: corrupt checkpoint at step {meta.get('step')} ({_reason(e)}); "
                "trying the previous checkpoint")
            bad += 1
            continue
        if bad:
            log(f"[pretrain] resuming from the previous good checkpoint, step {state['step']}")
        return state
    if bad:
        log("[pretrain] no readable checkpoint left; restarting from scratch")
    return None


def _reason(e: Exception) -> str:
    """Why a state was not loaded, in one line. torch's refusal of a pickle that is more than tensors (its message
    suggests ``weights_only=False``, which would run the pickle's code) becomes a plain refusal."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        first = next((line.strip()[:120] for line in str(e).splitlines() if "unsupported" in line.lower()), "")
        return ("UnpicklingError: not a plain state of tensors and containers, refused by torch.load(weights_only="
                f"True), as unpickling anything else can run code{f' ({first})' if first else ''}")
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def clear_states(out_dir: Path) -> None:
    """Remove saved states and temp files of interrupted saves (the run is complete)."""
    for pattern in ("state-*", ".state-*"):
        for p in Path(out_dir).glob(pattern):
            p.unlink(missing_ok=True)


def save_encoder(path: Path, encoder: torch.nn.Module, metadata: dict[str, str]) -> None:
    """The encoder as safetensors, the same bytes for the same weights and metadata (what DVC hashes)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path, suffix=".tmp.safetensors") as tmp:
        tmp.write_bytes(sorted_metadata(save(tensors, metadata=metadata)))


def sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the ``__metadata__`` entries in key order. safetensors writes them in hash-map order,
    which changes from process to process, so the same weights would give different files (and DVC hashes); the
    tensors' entries are already in a fixed order. The header keeps its length (the same entries, compact JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise ValueError(f"safetensors header grew from {n} to {len(text)} bytes when its metadata was sorted")
    return data[:8] + text.ljust(n) + data[8 + n:]
