"""The CPU decode step as native code: `native_decode.cpp`, built at first use and called through ctypes.

    step = NativeDecodeStep(model, cache)        # builds (~4 s, once per machine) or loads the library
    logits = step(tokens, positions)             # rows 0..B-1 of the slot cache -> (B, vocab) fp32
    last = step(chunk, range(p, p + n), [slot] * n, logits_for=[n - 1])  # a prompt chunk -> (1, vocab)

Why: a decode step of a small model on a CPU is dominated by what surrounds the matmuls. Eager PyTorch
runs ~100 ops a step, each with its dispatch and (with 2 threads) an OpenMP fork-join; torch.compile
cut that but kept MKL's fp32 GEMV, which ran single-threaded at ~9 GB/s here (bf16 goes through oneDNN).
The native step is one call: its matmuls split the weight rows between the threads and read each
weight once for all batch rows, and bf16 weights are widened in registers, so bf16 halves the bytes a
step reads. The same call prefills: rows of one slot at consecutive positions are a causal chunk (every
row's key is stored before any row attends), which the engine uses for bf16 prompts on CPUs without
bf16 units (`prefills`), where PyTorch's bf16 matmuls are slow. Measured numbers are in bench/engine.py's
table and the README.

The library is compiled with the machine's C++ compiler ($CXX, else g++) for this CPU (-march=native)
into $XDG_CACHE_HOME/codellm (else ~/.cache/codellm), named by a hash of the source, the flags, the
compiler and the CPU, so a home shared by different machines never loads code for another CPU. Code is
only loaded from a folder that is ours and writable by no one else; where the cache is not, a private
folder in the temp dir is used. The build goes to a temporary file that is renamed into place, so
concurrent first uses are safe.
Activations are fp32 whatever the weights' dtype: greedy tokens equal the fp32 reference; with bf16
weights they are at least as precise as the reference's bf16 activations (and may differ from them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from codellm import weights
from codellm.engine.kv_cache import SlotKVCache
from codellm.errors import UserError
from codellm.model import Transformer, rope_cos_sin
from codellm.weights import NativeMatrix

SOURCE = Path(__file__).with_name("native_decode.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
_library: ctypes.CDLL | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "codellm"


@functools.cache
def _cpu_fingerprint() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor() or platform.machine()


def _has_bf16_units() -> bool:
    return any(flag in _cpu_fingerprint().split() for flag in ("avx512_bf16", "amx_bf16"))


def _private(folder: Path) -> bool:
    """Code is loaded from here: the folder must be ours and writable by no one else."""
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def cxx_compiler() -> str:
    """The C++ compiler --compile builds with (this step, and inductor's CPU code): $CXX, else g++."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise UserError(f"--compile needs a C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)")
    return compiler


def build_library() -> Path:
    """The compiled library for this source, compiler and CPU: from the cache, or compiled now."""
    compiler = cxx_compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    name = f"native_decode-{key}.so"
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"codellm-{os.getuid()}"):
        try:  # an unwritable cache (a read-only home) falls back to the temp dir
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(folder):
                continue
            if (folder / name).exists():
                return folder / name
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            break
        except OSError:
            continue
    else:
        raise UserError(f"--compile: cannot write the native decode step to {cache_dir()} or the temp dir")
    os.close(fd)
    target = folder / name
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"--compile: building the native decode step with {compiler} failed:\n"
                            + done.stderr.strip()[-2000:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL:
    global _library
    if _library is None:
        lib = ctypes.CDLL(str(build_library()))
        lib.codellm_decoder_new.restype = ctypes.c_void_p
        lib.codellm_decoder_new.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p,
                                            ctypes.POINTER(NativeMatrix)] + [ctypes.c_void_p] * 6
        lib.codellm_decoder_step.restype = None
        lib.codellm_decoder_step.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_int32]
        lib.codellm_decoder_free.argtypes = [ctypes.c_void_p]
        _library = lib
    return _library


class NativeDecodeStep:
    """`DecodeStep`'s interface over the native step: logits for rows 0..B-1, their KV written."""

    def __init__(self, model: Transformer, cache: SlotKVCache):
        cfg = model.cfg
        model.fuse_projections()
        dtype = model.embed_tokens.weight.dtype  # of the embedding, norms and KV cache; matrices say their own
        if dtype not in (torch.float32, torch.bfloat16) or cache.store_k.device.type != "cpu":
            raise UserError(f"the native decode step runs fp32 or bf16 models on the CPU (got {dtype} on "
                            f"{cache.store_k.device.type})")
        t0 = time.perf_counter()
        self.lib = library()
        self.compile_seconds = time.perf_counter() - t0  # the build, or loading the cached library
        cos, sin = rope_cos_sin(cfg, torch.arange(cache.max_len)[None], torch.float32)  # the model's own tables
        half = cfg.head_dim // 2
        # tensors whose memory the native side reads; kept here so they live as long as the decoder
        self._keep = [cos[0, 0, :, :half].contiguous(), sin[0, 0, :, :half].contiguous()]
        matrices, norms = [], []
        for block in model.layers:
            for linear in (block.self_attn.qkv, block.self_attn.o_proj, block.mlp.gate_up, block.mlp.down_proj):
                matrices.append(weights.native_matrix(linear))
            norms += [weights.pointer(block.input_layernorm.weight, dtype),
                      weights.pointer(block.post_attention_layernorm.weight, dtype)]
        matrices.append(weights.native_matrix(model.lm_head))
        shape = (ctypes.c_int32 * 9)(cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                     cfg.hidden_dim, cfg.vocab_size, cache.n_slots, cache.max_len)
        self._handle = self.lib.codellm_decoder_new(
            shape, cfg.norm_eps, dtype == torch.bfloat16, weights.pointer(model.embed_tokens.weight, dtype),
            (NativeMatrix * len(matrices))(*matrices), (ctypes.c_void_p * len(norms))(*norms),
            weights.pointer(model.norm.weight, dtype), weights.pointer(cache.store_k, dtype),
            weights.pointer(cache.store_v, dtype), self._keep[0].data_ptr(), self._keep[1].data_ptr())
        # the native side holds raw pointers into these: keep them alive (and do not move the model's weights)
        self.model, self.cache, self.vocab = model, cache, cfg.vocab_size
        # prompt chunks too where PyTorch's matmuls are slower than ours: bf16 on a CPU without bf16 units
        # (oneDNN ran a bf16 GEMM at 18 GFLOP/s here, ours at ~75; MKL's fp32 GEMM beats ours), and
        # quantized matrices, which PyTorch widens to a dense copy on every forward
        quantized = any(m.kind not in (weights.KIND_F32, weights.KIND_BF16) for m in matrices)
        self.prefills = quantized or (dtype == torch.bfloat16 and not _has_bf16_units())

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int] | None = None,
                 logits_for: list[int] | None = None) -> torch.Tensor:
        """Rows of (token, position, slot) -> logits (len(logits_for), vocab) fp32, the rows' KV written.

        Decode: one row per slot, slots default to rows 0..B-1. Prefill: rows of one slot at consecutive
        positions (every row's key is stored before any row attends, so the chunk is causal); ask for the
        last row's logits only. logits_for defaults to every row."""
        B = len(tokens)
        slots = list(range(B)) if slots is None else slots
        logits_for = list(range(B)) if logits_for is None else logits_for
        # the native side indexes raw memory with these: out-of-range values must never reach it
        if not B or len(positions) != B or len(slots) != B:
            raise ValueError(f"{B} tokens, {len(positions)} positions and {len(slots)} slots: give one of each per row")
        if min(positions) < 0 or max(positions) >= self.cache.max_len or min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"positions must lie in [0, {self.cache.max_len}) and tokens in [0, {self.vocab})")
        if min(slots) < 0 or max(slots) >= self.cache.n_slots or len(set(zip(slots, positions, strict=True))) != B:
            raise ValueError(f"slots must lie in [0, {self.cache.n_slots}), each (slot, position) once")
        if logits_for and (min(logits_for) < 0 or max(logits_for) >= B):
            raise ValueError(f"logits_for must index the {B} rows")
        tok, pos, slot, out = (torch.tensor(v, dtype=torch.int64) for v in (tokens, positions, slots, logits_for))
        logits = torch.empty(len(logits_for), self.vocab)
        self.lib.codellm_decoder_step(self._handle, B, tok.data_ptr(), pos.data_ptr(), slot.data_ptr(),
                                      len(logits_for), out.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle:
            self.lib.codellm_decoder_free(handle)
