"""What every `codellm` command shares: model, sampling and engine options, loading a model, the default
model's path, and running a parser with the one error policy (a UserError is one line on stderr and exit
code 2; no tracebacks unless CODELLM_DEBUG=1). A leaf: the area CLIs (data/train/eval/server) and cli.py
import it, it imports none of them, so the command tree has no import cycle.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from codellm.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "default"
DEFAULT_INSTRUCT_MODEL = REPO_ROOT / "models" / "default-instruct"


def default_model_path(instruct: bool = False) -> Path:
    """$CODELLM_MODEL, else the shipped base model (chat: its instruct variant)."""
    if "CODELLM_MODEL" in os.environ:
        return Path(os.environ["CODELLM_MODEL"])
    return DEFAULT_INSTRUCT_MODEL if instruct and DEFAULT_INSTRUCT_MODEL.is_dir() else DEFAULT_MODEL


def add_model_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", type=Path, default=None,
                   help="HF-layout model directory (default: $CODELLM_MODEL, else the shipped models/default, "
                        "or models/default-instruct for chat)")
    g.add_argument("--device", default="auto", help="auto (cuda when a GPU is there, else cpu; every command's "
                                                    "default), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on cpu, "
                                                  "bfloat16 on cuda)")
    g.add_argument("--quantize", metavar="FORMAT", default=None,
                   help="weight-only quantization of the projections after loading: int8 (one scale per output "
                        "channel), int4 or nf4 (groups); embeddings and norms keep --dtype, the head too unless "
                        "--quantize-head. On a CPU it decodes through the native step (--compile implied)")
    g.add_argument("--group-size", type=int, default=None,
                   help="inputs per quantization scale: int4 32 (default), 64 or 128; nf4 64 (default); int8 "
                        "the whole row unless given")
    g.add_argument("--quantize-head", action="store_true", help="quantize the output head too")


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int = 256, heal: bool = False):
    g = p.add_argument_group("sampling")
    if heal:  # left-to-right prompts only: infilling and chat prompts end in their own tokens
        g.add_argument("--no-heal", action="store_true",
                       help="turn off token healing (default on: when the prompt ends inside what the tokenizer "
                            "merges, e.g. a newline before an indented line, its last token is backed off and "
                            "the model picks the merged token)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_engine_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("engine")
    g.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="memory for the KV cache, e.g. 512M or 2G; a request that does not fit is an error "
                        "(default: what the request needs)")
    g.add_argument("--compile", action="store_true",
                   help="fast decoding: on a CPU a native decode step, built once in seconds into "
                        "~/.cache/codellm (needs a C++ compiler); on a GPU torch.compile")


def engine_stream(args, model, tok, ids: list[int], params):
    """Events of one request through the engine, its slot sized for the request (as --kv-memory allows)."""
    from codellm.engine import Engine

    kv_memory = parse_size(args.kv_memory) if args.kv_memory else None
    engine = Engine(model, tok, max_batch=1, max_len=len(ids) + params.max_new_tokens, kv_memory=kv_memory,
                    compile=args.compile)
    return engine.stream(ids, params)


def sampling_params(args):
    from codellm.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop), heal=hasattr(args, "no_heal") and not args.no_heal)


def resolve_device(name: str | None) -> str:
    """The one --device rule of every command: "auto" (or None) is cuda when a GPU is there, else cpu; a
    cuda device asked for on a machine without one is an error."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available on this machine")
    return name


def model_dir(model: Path | None, instruct: bool = False) -> Path:
    """The model directory of --model (default: `default_model_path`), checked to be a directory."""
    path = Path(model) if model is not None else default_model_path(instruct)
    if model is None and not path.is_dir():
        raise UserError(f"no --model given and the default model {path} is not there; pass --model DIR "
                        "(a Hugging Face Llama/Code Llama directory)")
    if path.exists() and not path.is_dir():
        raise UserError(f"--model {path} is a file, not a directory: pass the model directory that holds "
                        "config.json, the weights and the tokenizer")
    return path


def load(args, instruct: bool = False):
    """(model, tokenizer) from --model/--device/--dtype."""
    from codellm import gguf
    from codellm.checkpoint import load_model
    from codellm.tokenizer import load_tokenizer

    file = Path(args.model) if args.model is not None else default_model_path(instruct)
    path = file if gguf.is_gguf(file) else model_dir(args.model, instruct)
    args.device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if gguf.is_gguf(path):  # a llama.cpp / Ollama file: weights, config and tokenizer in one (codellm/gguf.py)
        model, tok = gguf.load(path, device=args.device, dtype=dtype)
        return gguf.apply_options(model, args, path, quantize_loaded), tok
    return quantize_loaded(load_model(path, device=args.device, dtype=dtype), args, path), load_tokenizer(path)


def quantize_loaded(model, args, path: Path):
    """--quantize/--group-size/--quantize-head applied to a loaded model (codellm/weights.py)."""
    from codellm import weights

    fmt, group = getattr(args, "quantize", None), getattr(args, "group_size", None)
    stored = weights.quantization_config(model)
    if fmt is None and group is not None:
        raise UserError("--group-size needs --quantize")
    if fmt is not None and stored is not None:
        raise UserError(f"--quantize {fmt}: {path} is already quantized ({stored['format']}); load it as it is")
    if fmt is not None:
        options = {} if group is None else {"group": group}
        model = weights.quantize(model, fmt, skip=() if args.quantize_head else ("lm_head",), **options)
    if (fmt or stored) and args.device == "cpu" and hasattr(args, "compile"):
        args.compile = True  # PyTorch would widen every quantized matrix on every step; the native step reads them
    return model


def run_standalone(add_parser, argv: list[str] | None = None) -> int:
    """`python -m codellm.<area>.cli ...` (e.g. under torchrun): one area's commands, same error handling."""
    parser = argparse.ArgumentParser(prog="codellm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser, argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"codellm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codellm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if os.environ.get("CODELLM_DEBUG"):
            raise
        print(f"codellm: internal error: {type(e).__name__}: {e} (set CODELLM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return 0


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise UserError(f"cannot read {text!r} as a memory size (examples: 512M, 2G, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
