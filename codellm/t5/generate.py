"""T5 / CodeT5+ inference in its three modes: embeddings (encoder only), encoder-decoder generation, and
decoder-only generation (the encoder reads only the `[CLM]` token).

Generation runs the encoder once per batch, keeps each decoder block's cross-attention keys/values for the
whole request and its self-attention keys/values step by step (`DecoderCache`), and samples every row with
`sampling.sample_next` and its own RNG, so seeds, penalties and the greedy rule mean what they mean for
Llama. Rows leave the batch as they finish. Text comes out through `streaming.TextStream`, so stop
strings, stop ids and UTF-8 boundaries behave as for Llama too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from codellm.arch.t5 import T5, DecoderCache
from codellm.errors import UserError
from codellm.sampling import SamplingParams, make_generator, sample_next
from codellm.streaming import Event, TextStream

CLM_TOKEN = "[CLM]"  # the encoder's only input in decoder-only mode (CodeT5+ never released its id)
MAX_SENTINELS = 100


def pad_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, S) and their attention mask (1 = token)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise UserError("every encoder input needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_rows(model: T5, sources: list[list[int]], params: SamplingParams, stop_ids: set[int],
                  prefixes: list[list[int]] | None = None) -> Iterator[tuple[int, int]]:
    """Yield (row, token) as each row of the batch draws its next token, until the row draws a stop id
    (yielded too) or max_new_tokens. `sources` are the encoder inputs; `prefixes` optional decoder text
    after the start token (all of one length: the batch decodes in lockstep). Row i samples with seed
    `params.seed + i` (unseeded: a fresh seed each)."""
    device = next(model.parameters()).device
    prefixes = prefixes or [[] for _ in sources]
    if len(prefixes) != len(sources) or len({len(p) for p in prefixes}) > 1:
        raise UserError("decoder prefixes must be given for every row and be of one length")
    ids, mask = pad_batch(sources, model.cfg.pad_id, device)
    cache = DecoderCache(model, model.encode(ids, mask), mask)
    decoder = torch.tensor([[model.cfg.decoder_start_id] + p for p in prefixes], device=device)
    gens = [make_generator(None if params.seed is None else params.seed + i, device) for i in range(len(sources))]
    contexts = [row for row in decoder]  # for penalties: the decoder's tokens, start and prefix first
    n_prompt = decoder.shape[1]
    live = list(range(len(sources)))  # batch position -> original row
    logits = model.logits(model.decode(decoder, cache)[:, -1])
    for step in range(params.max_new_tokens):
        tokens, keep = [], []
        for j, row in enumerate(live):
            token = sample_next(logits[j], params, gens[row], contexts[row], n_prompt)
            yield row, token
            if token not in stop_ids and step + 1 < params.max_new_tokens:
                keep.append(j)
                tokens.append(token)
                if params.penalised:
                    contexts[row] = torch.cat([contexts[row], torch.tensor([token], device=device)])
        if not keep:
            return
        if len(keep) < len(live):
            cache.select(torch.tensor(keep, device=device))
            live = [live[j] for j in keep]
        logits = model.logits(model.decode(torch.tensor(tokens, device=device)[:, None], cache)[:, -1])


def generate(model: T5, sources: list[list[int]], params: SamplingParams, stop_ids: set[int],
             prefixes: list[list[int]] | None = None) -> list[list[int]]:
    """Token ids drawn per row (a final stop id included), for a batch of encoder inputs."""
    out: list[list[int]] = [[] for _ in sources]
    for row, token in generate_rows(model, sources, params, stop_ids, prefixes):
        out[row].append(token)
    return out


def stream_text(model: T5, tok, source: list[int], params: SamplingParams,
                prefix: list[int] = ()) -> Iterator[Event]:
    """One request as text events: the model's EOS, the tokenizer's EOS and `params.stop_ids` end it."""
    params = dataclasses.replace(params, stop_ids=params.stop_ids + (model.cfg.eos_id,))
    stream = TextStream(tok, params)
    for _, token in generate_rows(model, [source], params, stream.stop_ids, [list(prefix)]):
        event = stream.push(token)
        yield event
        if event.finished:
            return
    yield stream.finish("length")


# --- the modes, as text ---------------------------------------------------------------------------------

def encoder_ids(tok, text: str, max_len: int | None = None) -> list[int]:
    """CodeT5's encoder input: `<s> text </s>` (RoBERTa's template), the text cut to fit `max_len`."""
    ids = tok.encode(text)
    specials = [i for i in (tok.bos_id, tok.eos_id) if i is not None]
    if max_len is not None:
        if max_len <= len(specials):
            raise UserError(f"--max-length must be > {len(specials)} (got {max_len})")
        ids = ids[:max_len - len(specials)]
    return ([tok.bos_id] if tok.bos_id is not None else []) + ids + ([tok.eos_id] if tok.eos_id is not None else [])


def complete(model: T5, tok, prompt: str, params: SamplingParams, decoder_only: bool = False) -> Iterator[Event]:
    """Left-to-right completion. Encoder-decoder (default, as CodeT5+ 220M/770M run HumanEval): the
    encoder reads the prompt, the decoder writes what follows. Decoder-only: the encoder reads only
    `[CLM]` and the decoder continues the prompt itself."""
    if decoder_only:
        clm = tok.piece_to_id(CLM_TOKEN)
        if clm is None:
            raise UserError(f"decoder-only mode needs a {CLM_TOKEN} token in the tokenizer (the encoder's only "
                            "input); this tokenizer has none, so its model was not trained for that mode")
        return stream_text(model, tok, [clm], params, prefix=tok.encode(prompt))
    return stream_text(model, tok, encoder_ids(tok, prompt), params)


def sentinels(tok) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... (T5's span sentinels) that the tokenizer has."""
    ids = [tok.piece_to_id(f"<extra_id_{n}>") for n in range(MAX_SENTINELS)]
    return [i for i in ids if i is not None]


def infill(model: T5, tok, prefix: str, suffix: str, params: SamplingParams) -> Iterator[Event]:
    """Infilling as span denoising: the encoder reads `prefix <extra_id_0> suffix`, the decoder starts with
    `<extra_id_0>` and writes the span; the next sentinel (or EOS) ends it."""
    marks = sentinels(tok)
    if not marks:
        raise UserError("T5 infilling needs the <extra_id_0> sentinel token, which this tokenizer lacks")
    bos, eos = ([i] if i is not None else [] for i in (tok.bos_id, tok.eos_id))
    source = bos + tok.encode(prefix) + [marks[0]] + tok.encode(suffix) + eos
    params = dataclasses.replace(params, stop_ids=params.stop_ids + tuple(marks[1:]))
    return stream_text(model, tok, source, params, prefix=[marks[0]])


@torch.inference_mode()
def embed_texts(model: T5, tok, texts: list[str], max_len: int = 512, batch_size: int = 32) -> torch.Tensor:
    """Unit-norm embeddings (N, dim) of texts, as codet5p-110m-embedding computes them."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [encoder_ids(tok, t, max_len) for t in texts[start:start + batch_size]]
        ids, mask = pad_batch(rows, model.cfg.pad_id, device)
        out.append(model.embed(ids, mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def similarity(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (Q, D) of two sets of embeddings (already unit norm; normalised again for safety)."""
    return F.normalize(queries, dim=-1) @ F.normalize(docs, dim=-1).T
