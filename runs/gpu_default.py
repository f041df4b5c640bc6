"""Helpers of runs/gpu_default.sh: measure the bf16 peak, export models to $OUT as small shards, bundle
the run's records, and (back on the developer's machine) unpack what came back into a model folder.

    python3 runs/gpu_default.py peak                         # bf16 matmul TFLOP/s (8192^3, median of 10)
    python3 runs/gpu_default.py export MODEL_DIR NAME OUT RUN  # OUT/NAME-model-0000k-of-0000n.safetensors
    python3 runs/gpu_default.py bundle RUN OUT               # OUT/records.tar.gz: configs, metrics, plots, logs
    python3 runs/gpu_default.py unpack FILES_DIR NAME DEST   # rebuild an HF folder from the exported shards

Only the device's own packages are imported (torch, safetensors, tokenizers, numpy, matplotlib).
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

SHARD_BYTES = 15 * 2**20  # files coming back from the device are capped at 16 MiB each
RECORDS = ("config.json", "metrics.jsonl", "loss.png", "final/training.json", "final/config.json")


def peak() -> None:
    """bench/gpu.py's measurement: torch.mm of random 8192^3 bf16 matrices, median, CUDA events."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from gpu import matmul_peak

    print(f"{matmul_peak(torch.device('cuda'), 8192, torch.bfloat16) / 1e12:.0f}")


def export(model_dir: str, name: str, out: str, run: str) -> None:
    """bf16 shards of at most 15 MiB, renamed OUT/NAME-model-*.safetensors; config and shard index go to
    RUN/NAME-meta.json, which `bundle` puts into records.tar.gz."""
    from codellm.checkpoint import load_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        saved = save_model(load_model(model_dir, dtype="bfloat16"), Path(tmp) / "m", dtype="bfloat16",
                           max_shard_bytes=SHARD_BYTES)
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in sorted(saved.glob("*.safetensors")):
            part = Path(out) / f"{name}-{f.name}.part"
            shutil.copyfile(f, part)
            part.rename(Path(out) / f"{name}-{f.name}")  # whole files only, even if the call is cut short
        meta = {f.name: f.read_text() for f in saved.iterdir() if f.suffix == ".json"}
        (Path(run) / f"{name}-meta.json").write_text(json.dumps(meta))


def bundle(run: str, out: str) -> None:
    """One archive of the small records: each stage's config, metrics, loss plot; the corpus manifest's
    summary; times and logs; the exported models' json files."""
    run_dir, out_dir = Path(run), Path(out)
    part = out_dir / "records.tar.gz.part"
    with tarfile.open(part, "w:gz") as tar:
        for stage in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            for rel in RECORDS:
                if (stage / rel).is_file():
                    tar.add(stage / rel, f"{stage.name}/{rel}")
        manifest = run_dir / "corpus" / "manifest.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            summary = {k: v for k, v in m.items() if k not in ("packages",)}
            summary["packages"] = [{k: p[k] for k in ("name", "license", "permissive", "kept", "bytes", "split")}
                                   for p in m["packages"]]
            _add_text(tar, "corpus/manifest.json", json.dumps(summary, indent=1))
        for f in sorted(f for ext in ("tsv", "json", "log", "txt") for f in run_dir.glob(f"*.{ext}")):
            tar.add(f, f.name)
    part.rename(out_dir / "records.tar.gz")


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    import io

    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def unpack(files: str, name: str, dest: str, tokenizer_dir: str = "models/default") -> None:
    """An HF folder at DEST from FILES/NAME-model-*.safetensors, its json files from FILES/records.tar.gz
    and the tokenizer of `tokenizer_dir` (the run trains none: it uses the shipped one)."""
    from codellm.checkpoint import TOKENIZER_FILES, load_model, save_model

    src, dest_dir = Path(files), Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        for f in sorted(src.glob(f"{name}-model*.safetensors")):
            shutil.copyfile(f, folder / f.name.removeprefix(f"{name}-"))
        with tarfile.open(src / "records.tar.gz") as tar:
            meta = json.loads(tar.extractfile(f"{name}-meta.json").read())
        for fname, text in meta.items():
            (folder / fname).write_text(text)
        for t in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / t).is_file():
                shutil.copyfile(Path(tokenizer_dir) / t, folder / t)
        save_model(load_model(folder, dtype="bfloat16"), dest_dir, tokenizer_dir=folder, dtype="bfloat16")


if __name__ == "__main__":
    commands = {"peak": peak, "export": export, "bundle": bundle, "unpack": unpack}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
