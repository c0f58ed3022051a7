"""KV-cache generation for Baichuan 2 (prefill with ``bk.attention``, decode with ``bk.decode_attention``).

The cache is preallocated: per layer ``k, v: [B, S_max, H, Dh]`` with ``S_max`` = the longest prompt
+ ``max_new_tokens``, and int32 ``cache_seqlens [B]``. Prompts of different lengths are prefilled as
packed varlen sequences (no padding); each row then decodes at its own position.

Sampling follows the Hugging Face order: repetition penalty over every token seen so far (prompt
and output; positive logits divided, negative multiplied), then temperature, top-k, top-p.
``CHAT_DEFAULTS`` are Baichuan2-13B-Chat's ``generation_config.json`` (spec §10).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import torch

from .model import Baichuan2, KVCache

__all__ = ["GenerationConfig", "CHAT_DEFAULTS", "GREEDY", "KVCache", "TokenMeter", "generate", "generate_stream",
           "process_logits"]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 2048
    do_sample: bool = True
    temperature: float = 0.3
    top_k: int = 5  # 0 = off
    top_p: float = 0.85  # 1.0 = off
    repetition_penalty: float = 1.05  # 1.0 = off
    eos_token_id: Optional[int] = 2  # None: never stop early

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


CHAT_DEFAULTS = GenerationConfig()  # do_sample, T 0.3, top-k 5, top-p 0.85, repetition penalty 1.05
GREEDY = replace(CHAT_DEFAULTS, do_sample=False, repetition_penalty=1.0)


def process_logits(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """``logits [B, V]`` (fp32) → processed logits (``-inf`` for tokens that cannot be sampled).
    ``seen [B, V]`` bool marks the tokens already in each sequence (for the repetition penalty)."""
    if cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the strictly better tokens
        drop_sorted = before > cfg.top_p  # keep the smallest prefix reaching top_p (always >= 1 token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    logits = process_logits(logits.float(), seen, cfg)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_stream(model: Baichuan2, prompts: Sequence[Sequence[int]], cfg: GenerationConfig = CHAT_DEFAULTS,
                    *, generator: Optional[torch.Generator] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens [B], active [B])`` once per step as the tokens come: ``tokens[b]`` is row b's new
    token and ``active[b]`` whether row b was still generating (rows stop after emitting eos)."""
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    was_training = model.training
    model.eval()
    try:
        device = model.lm_head.weight.device
        tensors = [torch.as_tensor(list(p), dtype=torch.long, device=device) for p in prompts]
        if any(t.numel() == 0 for t in tensors):
            raise ValueError("every prompt needs at least one token (e.g. bos = 1)")
        V = model.config.vocab_size
        bad = [int(t.max()) for t in tensors if int(t.max()) >= V or int(t.min()) < 0]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {V}), got {bad[0]}")
        B = len(tensors)
        cache = model.new_kv_cache(B, max(len(t) for t in tensors) + cfg.max_new_tokens)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for b, t in enumerate(tensors):
            seen[b, t] = True
        active = torch.ones(B, dtype=torch.bool, device=device)
        logits = model.prefill(tensors, cache)  # [B, V]
        for step in range(cfg.max_new_tokens):
            tokens = _next_tokens(logits, seen, cfg, generator)  # [B]
            yield tokens, active.clone()
            seen[torch.arange(B, device=device), tokens] = True
            if cfg.eos_token_id is not None:
                active &= tokens != cfg.eos_token_id
            if not bool(active.any()) or step + 1 == cfg.max_new_tokens:
                return
            logits = model.decode_step(tokens, cache)
    finally:
        model.train(was_training)


def generate(model: Baichuan2, prompts: Sequence[Sequence[int]], cfg: GenerationConfig = CHAT_DEFAULTS, *,
             generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """Generated token ids per prompt (eos included when reached). ``on_token(row, token_id)`` is
    called as each token comes."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for tokens, active in generate_stream(model, prompts, cfg, generator=generator):
        for b in active.nonzero().flatten().tolist():
            token = int(tokens[b])
            outputs[b].append(token)
            if on_token is not None:
                on_token(b, token)
    return outputs


class TokenMeter:
    """Times a generation from its ``on_token`` callbacks: the first token ends the prefill (prompt
    forward + first sample), every later one is a decode step. Host time between callbacks; a token id
    reaching the host (``int(token)``) has synchronised the device, so GPU work is inside the numbers."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else None
        self.start = time.perf_counter()
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self.tokens = 0

    def wrap(self, on_token: Optional[Callable[[int, int], None]] = None) -> Callable[[int, int], None]:
        def callback(row: int, token: int) -> None:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.last, self.tokens = now, self.tokens + 1
            if on_token is not None:
                on_token(row, token)
        return callback

    def decode_tokens_per_s(self) -> Optional[float]:
        if self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    def report(self) -> str:
        if self.first is None:
            return "generated 0 tokens"
        rate = self.decode_tokens_per_s()
        where = f" on {self.device}" if self.device is not None else ""
        decode = f", decode {rate:.2f} tokens/s" if rate is not None else ""
        return (f"generated {self.tokens} tokens{where}: prefill + first token {1e3 * (self.first - self.start):.1f} ms"
                f"{decode} ({self.tokens - 1} decode steps in {self.last - self.first:.3f} s)")
