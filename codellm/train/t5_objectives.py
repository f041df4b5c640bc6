"""CodeT5+ pretraining objectives (RECIPE.md Part 2, §2.3-2.4) as example transforms and losses on a T5.

Stage 1 (unimodal code): span denoising (`span_corrupt`: 15% of tokens, mean span 3, indexed sentinels),
seq2seq causal LM (`seq2seq_clm`: a pivot uniform in 10-90% of the sequence; the encoder reads `[CLM]` +
the left part, the decoder writes the rest) and decoder-only causal LM (`decoder_clm`: the encoder reads only
`[CLM]`). Each transform returns (encoder ids, labels); `seq2seq_loss` is the loss for any of them.

Stage 2 (bimodal text-code pairs): text-code contrastive (`BimodalHeads.contrastive_loss`: bidirectional
InfoNCE over the projected, L2-normalised first-token encoder states with a learned temperature; in-batch
negatives only: the momentum encoder and its queue are NOT built yet) and text-code matching
(`BimodalHeads.matching_loss`: the decoder reads the code, first token replaced by the match token, `</s>`
appended, cross-attending to the text; a Linear(d, 2) head on the final state; one hard negative per text and
per code, drawn from the in-batch contrastive similarities). Not yet wired into `codellm train`.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

from codellm.arch.t5 import T5, DecoderCache

IGNORE = -100


def span_corrupt(ids: list[int], rng: random.Random, sentinels: list[int], eos_id: int,
                 noise: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """T5 span corruption: about `noise` of the tokens, in spans of mean length `mean_span`, each replaced
    by the next sentinel in the source; the target lists sentinel + span for each, then EOS."""
    n = len(ids)
    n_noise = max(1, min(n - 1, round(n * noise)))
    n_spans = max(1, min(len(sentinels), round(n_noise / mean_span), n_noise, n - n_noise))
    noise_lens = _split(n_noise, n_spans, rng)
    keep_lens = _split(n - n_noise, n_spans, rng)
    source, target, pos = [], [], 0
    for k, (keep, drop) in enumerate(zip(keep_lens, noise_lens, strict=True)):
        source += ids[pos:pos + keep] + [sentinels[k]]
        target += [sentinels[k]] + ids[pos + keep:pos + keep + drop]
        pos += keep + drop
    return source + ids[pos:] + [eos_id], target + [eos_id]


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` as `parts` positive lengths, uniformly at random (T5's random segmentation)."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def seq2seq_clm(ids: list[int], rng: random.Random, clm_id: int, eos_id: int) -> tuple[list[int], list[int]]:
    """Pivot uniform in [10%, 90%] of the sequence: `[CLM]` + left part to the encoder, right part + EOS out."""
    pivot = max(1, min(len(ids) - 1, int(len(ids) * rng.uniform(0.1, 0.9))))
    return [clm_id] + ids[:pivot], ids[pivot:] + [eos_id]


def decoder_clm(ids: list[int], clm_id: int, eos_id: int) -> tuple[list[int], list[int]]:
    """Decoder-only causal LM: the encoder reads only `[CLM]`; the decoder writes the whole sequence."""
    return [clm_id], ids + [eos_id]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def seq2seq_loss(model: T5, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean token cross-entropy of the labels given the encoder ids, for a batch of (ids, labels)."""
    device = next(model.parameters()).device
    source = pad([s for s, _ in pairs], model.cfg.pad_id).to(device)
    labels = pad([t for _, t in pairs], IGNORE).to(device)
    logits = model(source, model.shift_right(labels), (source != model.cfg.pad_id).long() | _first(source))
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def _first(ids: torch.Tensor) -> torch.Tensor:
    """Mask of column 0 (a row's first token counts even when it is the pad id, e.g. T5's decoder start)."""
    out = torch.zeros_like(ids)
    out[:, 0] = 1
    return out


class BimodalHeads(nn.Module):
    """What stage 2 adds to a seq2seq T5: `proj` (d -> embed_dim, as the embedding model's), a learned
    temperature, and the matching head `itm_head` (d -> 2) read at the decoder's final `</s>`."""

    def __init__(self, d_model: int, embed_dim: int = 256, temperature: float = 0.07):
        super().__init__()
        self.proj = nn.Linear(d_model, embed_dim)
        self.log_temp = nn.Parameter(torch.tensor(math.log(temperature)))
        self.itm_head = nn.Linear(d_model, 2)

    def embed(self, model: T5, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(model.encode(ids, mask)[:, 0]), dim=-1)

    def similarities(self, model: T5, text: torch.Tensor, code: torch.Tensor, pad_id: int) -> torch.Tensor:
        """(B, B) text-to-code similarity / temperature."""
        t = self.embed(model, text, (text != pad_id).long())
        c = self.embed(model, code, (code != pad_id).long())
        return t @ c.T / self.log_temp.exp().clamp(min=1e-3)

    def contrastive_loss(self, model: T5, text: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """½ (CE(text->code) + CE(code->text)) with the matching pair on the diagonal."""
        sim = self.similarities(model, text, code, model.cfg.pad_id)
        target = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2

    def match_logits(self, model: T5, text: torch.Tensor, code: torch.Tensor, match_id: int) -> torch.Tensor:
        """(B, 2) unmatched/matched logits: the decoder reads the code (first token -> the match token, EOS
        after the last real token) over the text's encoder states; the head reads the EOS state."""
        pad_id, eos = model.cfg.pad_id, model.cfg.eos_id
        lengths = (code != pad_id).sum(1)
        dec = torch.cat([code, torch.full_like(code[:, :1], pad_id)], dim=1)
        dec[:, 0] = match_id
        rows = torch.arange(code.shape[0], device=code.device)
        dec[rows, lengths] = eos
        text_mask = (text != pad_id).long()
        states = model.decode(dec, DecoderCache(model, model.encode(text, text_mask), text_mask))
        return self.itm_head(states[rows, lengths])

    def matching_loss(self, model: T5, text: torch.Tensor, code: torch.Tensor, match_id: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """CE over matched pairs and two hard negatives per pair (a code for each text, a text for each
        code), sampled in proportion to the in-batch contrastive similarity, never the true partner."""
        B = text.shape[0]
        with torch.no_grad():
            sim = self.similarities(model, text, code, model.cfg.pad_id)
            eye = torch.eye(B, dtype=torch.bool, device=sim.device)
            neg_code = torch.multinomial(sim.softmax(1).masked_fill(eye, 0) + 1e-9 * ~eye, 1, generator=generator)[:, 0]
            neg_text = torch.multinomial(sim.T.softmax(1).masked_fill(eye, 0) + 1e-9 * ~eye, 1,
                                         generator=generator)[:, 0]
        texts = torch.cat([text, text, text[neg_text]])
        codes = torch.cat([code, code[neg_code], code])
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(text.device)
        return F.cross_entropy(self.match_logits(model, texts, codes, match_id), labels)
