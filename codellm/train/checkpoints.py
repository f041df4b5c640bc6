"""Training-state checkpoints for exact resume, apart from the HF-layout model in RUN_DIR/final.

    RUN_DIR/checkpoints/step_000400/
        model/          HF-layout weights (fp32, the training master copy) + tokenizer: loads anywhere
        optimizer.pt    full AdamW state (moments, step counts)
        rng.pt          torch (and CUDA) generator states, one entry per rank
        state.json      step, tokens seen, world size, and per rank: the data position (file offsets,
                        the infilling transform's RNG, the partly packed row) and python/numpy RNG states

A checkpoint is written into `.step_N.tmp-PID`, flushed to disk and renamed, so a crash (even kill -9)
leaves either the complete directory or an ignored temp dir; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from codellm.checkpoint import save_model
from codellm.model import Transformer

STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name)[1]))


def remove_temp_dirs(run_dir: Path) -> None:
    """Half-written checkpoints of a crashed run."""
    root = Path(run_dir) / "checkpoints"
    for p in root.glob(".step_*.tmp-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def rng_states() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: Transformer, optimizer_state: dict, ranks: list[dict],
                    meta: dict, tokenizer_dir: Path, keep_last: int) -> Path:
    """Write checkpoints/step_N atomically (rank 0); `ranks` holds each rank's data + RNG states."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, tmp / "model", tokenizer_dir=tokenizer_dir, dtype=torch.float32)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save([{"torch": r["torch"], "cuda": r["cuda"]} for r in ranks], tmp / "rng.pt")
        per_rank = [{"data": r["data"], "python": r["python"], "numpy": r["numpy"]} for r in ranks]
        (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "world": len(ranks),
                                                    "ranks": per_rank}))
        _fsync_tree(tmp)
        if final.exists():  # a run resumed from an older checkpoint passes this step again
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, rank: int, device: torch.device) -> tuple[dict, dict, dict]:
    """(state.json with this rank's entry merged into it, optimizer state, this rank's RNG states)."""
    state = json.loads((path / "state.json").read_text())
    optimizer = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    rng = torch.load(path / "rng.pt", weights_only=True)[rank]
    mine = state["ranks"][rank]
    return state, optimizer, {**rng, "python": mine["python"], "numpy": mine["numpy"]}


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes them visible: a power cut must not leave empty files."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
