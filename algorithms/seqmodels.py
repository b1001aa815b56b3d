"""Sequence models for event data: a SASRec-style recommender and a small causal Transformer LM.

Both are the same causal self-attention stack (pre-LayerNorm blocks, learned positions) over a
vocabulary; they differ in defaults (SASRec: padding id 0, tied output weights, scores are dot
products with the item embeddings; LM: no padding). Every model accepts

- *hard* inputs: ``LongTensor [B, L]`` of token / item ids, and
- *soft* inputs: ``FloatTensor [B, L, V]``, one distribution over the vocabulary per position,
  embedded as ``probs @ embedding`` (Farzi's synthetic sequences),

and returns next-token logits ``[B, L, V]``. Attention is written out (no fused kernel) so that
double backward works: Farzi's reverse-mode Adam needs Hessian-vector products through it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqModelConfig:
    vocab_size: int
    max_len: int
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.0  # used only in module.train() mode (in Farzi's inner loop only with inner_dropout)
    pad_id: int | None = None
    tie_weights: bool = True
    ffn_mult: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: SeqModelConfig):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"model dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.heads, self.p = cfg.heads, cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.dim)
        # no bias: a key bias only shifts every score of a row, so its gradient is 0 up to rounding
        # noise, which Adam normalises to full-size steps and Farzi's meta-gradient amplifies
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim)
        self.fc2 = nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim)

    def forward(self, h: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(blocked, float("-inf")).softmax(-1)
        att = F.dropout(att, self.p, self.training)
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = h + F.dropout(self.proj(y), self.p, self.training)
        return h + F.dropout(self.fc2(F.gelu(self.fc1(self.ln2(h)))), self.p, self.training)


class CausalTransformer(nn.Module):
    def __init__(self, cfg: SeqModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = None if cfg.tie_weights else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.register_buffer("causal", torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool).triu(1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n = x.shape[1]
        if n > cfg.max_len:
            raise ValueError(f"sequence length {n} exceeds the model's max_len {cfg.max_len}")
        blocked = self.causal[:n, :n]
        if x.is_floating_point():  # soft inputs: a distribution over the vocabulary per position
            h = x @ self.tok.weight
        else:
            h = self.tok(x)
            if cfg.pad_id is not None:
                pad = x == cfg.pad_id  # [B, L]; a padded key is never attended to (except by itself)
                h = h * (~pad).unsqueeze(-1)
                eye = torch.eye(n, dtype=torch.bool, device=x.device)
                blocked = blocked | (pad.unsqueeze(1) & ~eye)
                blocked = blocked.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        h = h * math.sqrt(cfg.dim) + self.pos.weight[:n]
        h = F.dropout(h, cfg.dropout, self.training)
        for blk in self.blocks:
            h = blk(h, blocked)
        h = self.ln(h)
        return h @ self.tok.weight.t() if self.head is None else self.head(h)


def build_seq_model(model: dict, vocab_size: int, pad_id: int | None) -> CausalTransformer:
    """From a spec's ``model`` section: ``{"name": "sasrec" | "transformer_lm", dim, blocks, heads,
    max_len, dropout}``. SASRec ties its output to the item embeddings; the LM does by default too."""
    spec = dict(model)
    name = spec.pop("name", "sasrec")
    if name not in ("sasrec", "transformer_lm"):
        raise ValueError(f"unknown sequence model {name!r} (known: sasrec, transformer_lm)")
    return CausalTransformer(SeqModelConfig(vocab_size=vocab_size, pad_id=pad_id, **spec))


def seeded_seq_model(model: dict, vocab_size: int, pad_id: int | None, seed: int) -> CausalTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_seq_model(model, vocab_size, pad_id)


def hard_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Next-token cross-entropy on real sequences: position t predicts id t+1; positions whose
    input or target is padding are ignored."""
    v = logits.shape[-1]
    targets = ids[:, 1:]
    if pad_id is not None:
        targets = targets.masked_fill((ids[:, :-1] == pad_id) | (targets == pad_id), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), targets.reshape(-1), ignore_index=-100)


def last_item_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int | None,
                   mask_seen: bool = False) -> torch.Tensor:
    """Cross-entropy of each real sequence's last id given everything before it (the position a
    leave-one-out evaluation ranks); sequences of one id (padding before it) are ignored.
    ``mask_seen``: the softmax runs over the ids the sequence has not seen before its last (and
    not over the padding id), as the evaluation ranks the target among unseen items only."""
    targets = ids[:, -1]
    if pad_id is not None:
        targets = targets.masked_fill((ids[:, -2] == pad_id) | (targets == pad_id), -100)
    scores = logits[:, -2]
    if mask_seen:
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids[:, :-1], True)
        if pad_id is not None:
            seen[:, pad_id] = True
        seen.scatter_(1, ids[:, -1:], False)  # never the target itself
        scores = scores.masked_fill(seen, -math.inf)
    return F.cross_entropy(scores, targets, ignore_index=-100)


MASKED = -1e9  # a masked score: no probability, and finite, so that 0 x log(0) terms stay 0 under autograd


def teacher_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, pad_id: int | None,
                 positions: str = "all") -> torch.Tensor:
    """Cross-entropy of the model's next-id distributions against a teacher's (soft targets) on the
    real sequences ``ids``: at every position holding a real id (``all``), or at each sequence's
    final one (``last``: the prediction of the id after the sequence, the one a leave-one-out
    evaluation ranks; ``last_unseen``: the same over the ids the sequence has not seen). The padding
    id gets no probability on either side."""
    if positions == "all":
        keep = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
        s, t, seen = logits[keep], teacher_logits[keep], None
    else:
        keep = ids[:, -1] != pad_id if pad_id is not None else torch.ones_like(ids[:, -1], dtype=torch.bool)
        s, t = logits[:, -1][keep], teacher_logits[:, -1][keep]
        seen = (torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids[keep], True)
                if positions == "last_unseen" else None)
    if pad_id is not None:
        pad = torch.zeros(s.shape[-1], dtype=torch.bool, device=s.device)
        pad[pad_id] = True
        seen = pad.expand_as(s) if seen is None else seen | pad
    if seen is not None:
        s, t = s.masked_fill(seen, MASKED), t.masked_fill(seen, MASKED)
    return -(t.softmax(-1) * s.log_softmax(-1)).sum(-1).mean()


def soft_loss(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on soft sequences: position t against the distribution at t+1."""
    return -(probs[:, 1:] * logits[:, :-1].log_softmax(-1)).sum(-1).mean()


def sequence_loss(logits: torch.Tensor, x: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    return soft_loss(logits, x) if x.is_floating_point() else hard_loss(logits, x, pad_id)
