"""`codellm embed` and `codellm generate` (T5 / CodeT5+), and what `complete`, `infill`, `chat` and `info`
do when --model is a T5 folder (cli.py hands such a model over here; this module never imports cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from codellm.errors import UserError


def is_t5(model_or_cfg) -> bool:
    from codellm.arch.t5 import T5, T5Config

    return isinstance(model_or_cfg, (T5, T5Config))


def check_vocab(model, tok):
    """A tokenizer with ids past the model's embedding table would index out of range mid-request."""
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary {model.cfg.vocab_size}: "
                        "they do not belong together")


def _require_seq2seq(model, command: str):
    if model.cfg.kind != "seq2seq":
        raise UserError(f"`codellm {command}` needs a model that generates; this T5 folder is a {model.cfg.kind} "
                        "model (encoder only): use `codellm embed`")


def refuse(model, command: str):
    """Commands a T5 model has no mode for."""
    if is_t5(model):
        raise UserError(f"`codellm {command}` runs Llama-family chat models; a T5 / CodeT5+ model has no chat "
                        "template: use `codellm generate` (encoder-decoder) or `codellm complete`")


def complete(args, model, tok, prompt: str):
    from codellm.options import sampling_params
    from codellm.t5 import generate

    _require_seq2seq(model, "complete")
    check_vocab(model, tok)
    if args.echo:
        sys.stdout.write(prompt)
    params = sampling_params(args)
    _print_stream(generate.complete(model, tok, prompt, _no_heal(params)))


def infill(args, model, tok, prefix: str, suffix: str):
    """T5 infilling is span denoising: `prefix <extra_id_0> suffix` in, the span out."""
    from codellm.options import sampling_params
    from codellm.streaming import collect
    from codellm.t5 import generate

    _require_seq2seq(model, "infill")
    check_vocab(model, tok)
    events = generate.infill(model, tok, prefix, suffix, sampling_params(args))
    if args.show_file:
        filled = prefix + collect(events) + suffix
        sys.stdout.write(filled if filled.endswith("\n") else filled + "\n")
    else:
        _print_stream(events)


def info(cfg, where: str, dtype_name: str | None):
    from codellm.checkpoint import parse_dtype

    dtype = parse_dtype(dtype_name or "bfloat16")
    n = cfg.num_params()
    gated, act = cfg.activation
    rows = [("model", where), ("kind", f"T5 {cfg.kind}"), ("parameters", f"{n:,} ({n / 1e6:.1f}M)"),
            ("layers (encoder / decoder)", f"{cfg.n_layers} / {cfg.n_decoder_layers}"),
            ("d_model / d_kv / d_ff", f"{cfg.d_model} / {cfg.d_kv} / {cfg.d_ff}"), ("heads", str(cfg.n_heads)),
            ("feed-forward", f"{'gated ' if gated else ''}{act}"),
            ("positions", f"relative, {cfg.num_buckets} buckets up to {cfg.max_distance}; trained on "
                          f"{cfg.max_seq_len} tokens"),
            ("head", "tied to the embedding" if cfg.tied else "untied"), ("vocab", f"{cfg.vocab_size:,}"),
            (f"weights in {str(dtype).removeprefix('torch.')}", f"{n * dtype.itemsize / 2**20:.1f} MiB")]
    if cfg.kind == "embedding":
        rows.append(("embedding", f"{cfg.embed_dim} dims, L2-normalised"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _print_stream(events):
    last = ""
    for event in events:
        sys.stdout.write(event.text)
        sys.stdout.flush()
        last = event.text or last
    if not last.endswith("\n"):
        sys.stdout.write("\n")


def _stdin(what: str) -> str:
    if sys.stdin.isatty():
        raise UserError(f"give the {what} as an argument or on standard input")
    return sys.stdin.read()


def _no_heal(params):
    """Token healing backs off a prompt's last token for a decoder that continues it; a T5 encoder reads the
    whole prompt, so there is nothing to heal."""
    import dataclasses

    return dataclasses.replace(params, heal=False)


def _load(args):
    from codellm.options import load

    model, tok = load(args)
    if not is_t5(model):
        raise UserError(f"--model {args.model}: `codellm {args.command}` runs T5 / CodeT5+ models; this is a "
                        f"{type(model).__name__}")
    check_vocab(model, tok)
    return model, tok


def _texts(args) -> list[str]:
    if args.file is not None:
        try:
            lines = args.file.read_text().splitlines()
        except OSError as e:
            raise UserError(f"--file {args.file}: {e.strerror}") from None
        texts = [json.loads(line)["text"] if args.jsonl else line for line in lines if line.strip()]
    elif args.text:
        texts = list(args.text)
    elif not sys.stdin.isatty():
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    else:
        raise UserError("give texts as arguments, with --file, or one per line on standard input")
    if not texts:
        raise UserError("there is no text to embed")
    return texts


def cmd_embed(args):
    from codellm.t5 import generate

    if args.max_length < 3:
        raise UserError(f"--max-length must be >= 3 (got {args.max_length})")
    texts = _texts(args)
    model, tok = _load(args)
    vectors = generate.embed_texts(model, tok, texts, max_len=args.max_length)
    if args.query is not None:
        query = generate.embed_texts(model, tok, [args.query], max_len=args.max_length)
        scores = generate.similarity(query, vectors)[0]
        for i in scores.argsort(descending=True)[:args.top or None].tolist():
            print(f"{scores[i]:.4f}\t{texts[i]}")
        return
    for text, vec in zip(texts, vectors.tolist(), strict=True):
        print(json.dumps({"text": text, "embedding": [round(x, 6) for x in vec]}))


def cmd_generate(args):
    from codellm.options import sampling_params
    from codellm.t5 import generate

    params = sampling_params(args)
    source = args.source if args.source not in (None, "-") else _stdin("source text")
    if not source.strip():
        raise UserError("the source text is empty: give it as an argument or on standard input")
    model, tok = _load(args)
    _require_seq2seq(model, "generate")
    if args.decoder_only:
        _print_stream(generate.complete(model, tok, source, params, decoder_only=True))
        return
    prefix = tok.encode(args.decoder_prefix) if args.decoder_prefix else []
    _print_stream(generate.stream_text(model, tok, generate.encoder_ids(tok, source), params, prefix))


def add_parser(sub) -> None:
    from codellm.options import add_model_options, add_sampling_options

    p = sub.add_parser("embed", help="text/code embeddings with a T5 encoder (CodeT5+ embedding model)")
    p.add_argument("text", nargs="*", help="texts to embed (default: --file, else one per line on standard input)")
    p.add_argument("--file", type=Path, help="one text per line (with --jsonl: objects with a \"text\" field)")
    p.add_argument("--jsonl", action="store_true", help="--file is JSON lines")
    p.add_argument("--query", help="rank the texts by cosine similarity to this query instead of printing vectors")
    p.add_argument("--top", type=int, default=0, help="with --query: print only the best N (0 = all)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text, <s> and </s> included")
    add_model_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("generate", help="encoder-decoder generation with a T5 / CodeT5+ model (text->code, "
                                        "code->text)")
    p.add_argument("source", nargs="?", help="encoder input (default: standard input)")
    p.add_argument("--decoder-prefix", help="text the decoder starts with (after its start token)")
    p.add_argument("--decoder-only", action="store_true",
                   help="decoder-only mode: the encoder reads only [CLM], the decoder continues SOURCE")
    add_model_options(p), add_sampling_options(p)
    p.set_defaults(func=cmd_generate)
