"""`codellm ...`: one entry point, subcommands that call plain functions.

Errors a user can fix arrive as UserError and print as one line with exit code 2; no tracebacks unless
CODELLM_DEBUG=1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codellm.errors import UserError
from codellm.options import (
    add_engine_options,
    add_model_options,
    add_sampling_options,
    engine_stream,
    load,
    run,
    sampling_params,
)
from codellm.t5 import cli as t5_cli


def print_stream(events) -> None:
    last = None
    for event in events:
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event
    if last is not None and not (last.text or "").endswith("\n"):
        sys.stdout.write("\n")


def read_text_arg(value: str | None, what: str) -> str:
    if value is not None and value != "-":
        return value
    if sys.stdin.isatty() and value is None:
        raise UserError(f"give the {what} as an argument or on standard input")
    return sys.stdin.read()


def require_text(text: str, what: str, blank_ok: bool = False) -> str:
    """`text`, refused when empty (or, unless `blank_ok`, only whitespace): the model would have nothing
    to continue but BOS."""
    if not (text if blank_ok else text.strip()):
        raise UserError(f"the {what} is empty: give it as an argument or on standard input")
    return text


# --- commands ---------------------------------------------------------------------------------------

def cmd_complete(args):
    params = sampling_params(args)
    model, tok = load(args)
    prompt = require_text(read_text_arg(args.prompt, "prompt"), "prompt", blank_ok=True)
    if t5_cli.is_t5(model):  # encoder-decoder: the encoder reads the prompt
        return t5_cli.complete(args, model, tok, prompt)
    ids = tok.encode(prompt, bos=True)
    if args.echo:
        sys.stdout.write(prompt)
    print_stream(engine_stream(args, model, tok, ids, params))


def cmd_infill(args):
    from codellm import formats
    from codellm.streaming import collect

    params = sampling_params(args)
    if args.file is not None:
        if args.prefix is not None or args.suffix is not None:
            raise UserError("use either --file/--cursor or --prefix/--suffix, not both")
        try:
            text = args.file.read_text()
        except OSError as e:
            raise UserError(f"--file {args.file}: {e.strerror}") from None
        if text.count(args.cursor) != 1:
            raise UserError(f"--file {args.file} must contain the cursor mark {args.cursor!r} exactly once "
                            f"(found {text.count(args.cursor)})")
        prefix, suffix = text.split(args.cursor)
    else:
        if args.prefix is None:
            raise UserError("infill needs --prefix (and usually --suffix), or --file with a --cursor mark")
        prefix, suffix = args.prefix, args.suffix or ""
    if not (prefix or suffix):
        raise UserError("--prefix and --suffix are both empty: there is nothing to fill between")
    model, tok = load(args)
    if t5_cli.is_t5(model):  # span denoising: prefix <extra_id_0> suffix
        return t5_cli.infill(args, model, tok, prefix, suffix)
    ids = formats.infill_prompt(tok, prefix, suffix, args.order)
    events = engine_stream(args, model, tok, ids, params)
    if args.show_file:
        middle = collect(events)
        filled = prefix + middle + suffix
        sys.stdout.write(filled if filled.endswith("\n") else filled + "\n")
    else:
        print_stream(events)


def cmd_chat(args):
    from codellm import formats

    params = sampling_params(args)
    model, tok = load(args, instruct=True)
    t5_cli.refuse(model, "chat")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        messages.append({"role": "user", "content": require_text(read_text_arg(args.message, "message"), "message")})
        print_stream(engine_stream(args, model, tok, formats.chat_tokens(tok, messages)[0], params))
        return
    interactive, turns = sys.stdin.isatty(), 0
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        turns += 1
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = ""
        for event in engine_stream(args, model, tok, formats.chat_tokens(tok, messages)[0], params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            answer += event.text
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
    if not interactive and not turns:
        raise UserError("chat read no message from standard input (it was empty): give a message as an "
                        "argument or on standard input")


def cmd_info(args):
    from codellm.checkpoint import load_config, parse_dtype
    from codellm.config import ModelConfig
    from codellm.options import model_dir
    from codellm.tokenizer import load_tokenizer

    if args.preset:
        cfg, tok, where = ModelConfig.from_preset(args.preset), None, f"preset {args.preset}"
    else:
        from codellm import gguf

        if gguf.is_gguf(args.model):  # a llama.cpp / Ollama file (codellm/gguf.py)
            cfg, tok, where = gguf.load_config(args.model), gguf.load_tokenizer(args.model), str(args.model)
        else:
            path = model_dir(args.model)
            cfg, tok, where = load_config(path), load_tokenizer(path), str(path)
        if t5_cli.is_t5(cfg):
            return t5_cli.info(cfg, where, args.dtype)
    dtype = parse_dtype(args.dtype or "bfloat16")
    nbytes = dtype.itemsize
    n = cfg.num_params()
    kv = cfg.kv_bytes_per_token(nbytes)
    rows = [
        ("model", where),
        ("parameters", f"{n:,} ({count(n)})"),
        ("layers / dim / ffn", f"{cfg.n_layers} / {cfg.dim} / {cfg.hidden_dim}"),
        ("heads (q / kv)", f"{cfg.n_heads} / {cfg.n_kv_heads}" + (" (GQA)" if cfg.n_kv_heads < cfg.n_heads else "")),
        ("context", f"{cfg.max_seq_len:,} tokens"),
        ("rope theta / scaling", f"{cfg.rope_theta:g} / {cfg.rope_scaling:g}"),
        ("vocab", f"{cfg.vocab_size:,}"),
        (f"weights in {str(dtype).removeprefix('torch.')}", _gib(n * nbytes)),
        *_quantized_sizes(cfg, nbytes),
        ("kv cache per token", f"{kv / 1024:.1f} KiB"),
        ("kv cache, full context", _gib(kv * cfg.max_seq_len)),
    ]
    if tok is not None:
        fim = "yes" if tok.prefix_id is not None else "no"
        rows.append(("infilling tokens", f"{fim} (PRE/SUF/MID/EOT = {tok.prefix_id}/{tok.suffix_id}/"
                                         f"{tok.middle_id}/{tok.eot_id})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_tokenizer_train(args):
    from itertools import islice

    from codellm.data.build import FORMAT as CORPUS_FORMAT
    from codellm.data.shards import load_manifest, read_corpus
    from codellm.tokenizer_train import train_tokenizer

    if args.max_docs is not None and args.max_docs < 1:
        raise UserError(f"--max-docs must be >= 1 (got {args.max_docs})")
    if args.out.exists() and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace the tokenizer files in it")
    n_docs = load_manifest(args.corpus, CORPUS_FORMAT, "--corpus")["splits"]["train"]["docs"]
    # the corpus is stored package by package: an even stride samples every part of it
    stride = max(1, n_docs // args.max_docs) if args.max_docs else 1
    texts = islice((doc["text"] for doc in read_corpus(args.corpus, "train")), 0, None, stride)
    out = train_tokenizer(islice(texts, args.max_docs), args.out, vocab_size=args.vocab_size)
    print(f"tokenizer written to {out}")


def count(n: int) -> str:
    """A parameter count as people say it: 33.7B, 6.7B, 110.5M, 12.3K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_convert(args):
    from codellm.checkpoint import convert

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace it")
    out = convert(args.src, args.out, args.dtype)
    print(f"wrote the Hugging Face layout to {out}")


def cmd_quantize(args):
    from codellm import weights
    from codellm.checkpoint import load_model, save_model
    from codellm.options import model_dir

    src = model_dir(args.src)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace it")
    if args.out.resolve() == src.resolve():
        raise UserError(f"--out {args.out} is the source directory; write the quantized model elsewhere")
    model = load_model(src, dtype=args.dtype)
    if weights.quantization_config(model) is not None:
        raise UserError(f"{src} is already quantized")
    options = {} if args.group_size is None else {"group": args.group_size}
    weights.quantize(model, args.format, skip=() if args.quantize_head else ("lm_head",), **options)
    out = save_model(model, args.out, tokenizer_dir=src)
    print(f"wrote {args.format} weights to {out} ({_gib(sum(p.stat().st_size for p in out.glob('*.safetensors')))})")


def cmd_export_gguf(args):
    from codellm import gguf

    if args.out.exists() and not args.force:
        raise UserError(f"--out {args.out} already exists; pass --force to replace it")
    out = gguf.export(args.model, args.out, args.type)
    print(f"wrote {args.type} GGUF to {out} ({_gib(out.stat().st_size)})")


def _quantized_sizes(cfg, dense_bytes: int) -> list[tuple[str, str]]:
    """What the weights take under each --quantize choice (projections quantized; the rest in the dtype)."""
    from codellm import weights

    dense = cfg.num_params() - cfg.n_layers * sum(i * o for i, o in cfg.projection_shapes())
    rows = []
    for fmt, options in (("int8", {}), ("int4", {"group": 32}), ("int4", {"group": 128}), ("nf4", {"group": 64})):
        name = f"weights, --quantize {fmt}" + (f" --group-size {options['group']}" if fmt == "int4" else "")
        try:
            size = dense * dense_bytes + cfg.n_layers * sum(
                weights.format_bytes(fmt, i, o, **options) for i, o in cfg.projection_shapes())
            rows.append((name, _gib(size)))
        except UserError as e:
            rows.append((name, f"n/a ({e})"))
    return rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codellm", description="Code Llama, self-hosted: complete, infill, "
                                     "chat, train, serve and evaluate code models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("complete", help="left-to-right completion of a prompt")
    p.add_argument("prompt", nargs="?", help="prompt text (default: standard input)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    add_model_options(p), add_sampling_options(p, heal=True), add_engine_options(p)
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("infill", help="fill the middle between a prefix and a suffix (<PRE> <SUF> <MID>)")
    p.add_argument("--prefix", help="code before the gap")
    p.add_argument("--suffix", help="code after the gap")
    p.add_argument("--file", type=Path, help="a file containing the cursor mark where the middle goes")
    p.add_argument("--cursor", default="<FILL_ME>", help="cursor mark in --file (default: <FILL_ME>)")
    p.add_argument("--order", choices=("psm", "spm"), default="psm",
                   help="prefix-suffix-middle (default) or suffix-prefix-middle prompt layout")
    p.add_argument("--show-file", action="store_true", help="print the whole filled file, not just the middle")
    add_model_options(p), add_sampling_options(p, max_new_tokens=128), add_engine_options(p)
    p.set_defaults(func=cmd_infill)

    p = sub.add_parser("chat", help="instruction chat with the Llama-2 [INST] template")
    p.add_argument("message", nargs="?", help="one-shot message; without it, read turns from standard input")
    p.add_argument("--system", help="system prompt")
    add_model_options(p), add_sampling_options(p, max_new_tokens=512), add_engine_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="parameters, context, dtype, rope theta and memory of a model")
    p.add_argument("--preset", help="describe a named preset instead of a model directory")
    add_model_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="write a model (Meta's consolidated.NN.pth download, or HF) in the Hugging "
                       "Face layout: config.json, safetensors, tokenizer")
    p.add_argument("src", type=Path, help="model directory: Meta's (params.json, consolidated.NN.pth, "
                   "tokenizer.model) or a Hugging Face one")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", help="weights dtype: float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write a model with int8/int4/nf4 weights, which loads without "
                       "re-quantizing (config.json's quantization_config)")
    p.add_argument("src", type=Path, help="model directory")
    p.add_argument("format", help="int8 | int4 | nf4")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--group-size", type=int, default=None, help="as for --quantize")
    p.add_argument("--quantize-head", action="store_true", help="quantize the output head too")
    p.add_argument("--dtype", default="bfloat16", help="dtype of what stays dense (default bfloat16)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a model in another program's format (gguf: llama.cpp, Ollama)")
    esub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    e = esub.add_parser("gguf", help="one GGUF file for llama.cpp / Ollama (llama architecture, tokenizer inside)")
    e.add_argument("model", type=Path, help="model directory (Hugging Face layout)")
    e.add_argument("--type", default="f16", choices=("f16", "q8_0", "q4_0"), help="weight type (default f16)")
    e.add_argument("--out", type=Path, required=True, help="output .gguf file (written atomically)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")
    e.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with the infilling tokens")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train on the train split of a corpus (codellm data build)")
    t.add_argument("--corpus", type=Path, required=True, help="corpus directory from `codellm data build`")
    t.add_argument("--out", type=Path, required=True, help="output directory (tokenizer.json + config)")
    t.add_argument("--vocab-size", type=int, default=16384)
    t.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    t.add_argument("--force", action="store_true", help="replace the tokenizer files of an existing --out")
    t.set_defaults(func=cmd_tokenizer_train)

    from codellm.data import cli as data_cli
    from codellm.eval import cli as eval_cli
    from codellm.server import cli as server_cli
    from codellm.train import cli as train_cli

    for area in (data_cli, train_cli, eval_cli, server_cli, t5_cli):  # each adds its commands; none imports this module
        area.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
