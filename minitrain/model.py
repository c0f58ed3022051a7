"""Baichuan 2 (7B: RoPE, 13B: ALiBi) built from baichuan_kernels modules (BAICHUAN2_SPEC.md §2–9).

Module names follow the released checkpoints, so ``state_dict()`` keys are the Hugging Face keys
(``model.embed_tokens``, ``model.layers.{i}.self_attn.W_pack``, ..., ``lm_head``)::

    h  = embed_tokens(input_ids)                                  [B, T, D]
    per layer (pre-norm; the residual add is fused into the next RMSNorm):
        a, s = input_layernorm(h, residual=s)                     s: the residual stream
        h    = o_proj(attention(W_pack(a)))                       RoPE (split_qkv_rope) or ALiBi
        a, s = post_attention_layernorm(h, residual=s)
        h    = down_proj(swiglu(gate_proj(a), up_proj(a)))
    y = norm(h, residual=s)
    logits = y @ normalize(lm_head)ᵀ        (only without labels; the loss never builds them)

Masks (``attention_mask [B, T]``): 0 is padding; equal non-zero values are one sequence. A 0/1 mask
is left/right padding; integer segment ids (1, 2, 3, ...) are packed samples (a new sequence starts
wherever the id changes along a row). Masked batches are unpadded: the non-pad tokens are gathered
into one packed row, every run of equal ids becomes one varlen sequence (``cu_seqlens``), RoPE
positions restart at 0 in each (this equals ``cumsum(mask) - 1`` for padding), and logits are
scattered back to ``[B, T, V]`` (zeros at pads). No T×T mask exists anywhere. A target whose token
is a pad or belongs to another sequence is ignored, so a packed sequence trains exactly as alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import baichuan_kernels as bk
from baichuan_kernels.nn import AlibiSlopes, Attention, NormHead, RMSNorm, RotaryEmbedding, SwiGLU, backend_for

from .config import Baichuan2Config

__all__ = ["Baichuan2", "Baichuan2Output", "DecoderLayer", "Packing", "pack_attention_mask"]

IGNORE_INDEX = -100


@dataclass
class Baichuan2Output:
    logits: Optional[torch.Tensor] = None  # [B, T, V] (no labels)
    loss: Optional[torch.Tensor] = None  # ce + z_loss_weight * z (with labels), fp32
    ce: Optional[torch.Tensor] = None  # mean cross-entropy over the trained targets
    z: Optional[torch.Tensor] = None  # mean max-logit² over the same targets


@dataclass
class Packing:
    """Where the non-pad tokens of a masked ``[B, T]`` batch go in one packed row of ``N`` tokens."""

    index: torch.Tensor  # [N] int64: flat indices into B*T of the kept tokens, in order
    cu_seqlens: torch.Tensor  # [S + 1] int32: sequence boundaries in the packed row
    max_seqlen: int  # the longest sequence
    position_ids: torch.Tensor  # [1, N] int64: position of each token inside its sequence
    next_in_seq: torch.Tensor  # [B, T] bool: token t+1 of the row continues token t's sequence


def pack_attention_mask(attention_mask: torch.Tensor) -> Packing:
    """Unpad a ``[B, T]`` mask of 0 (pad) / sequence ids: runs of equal non-zero ids are sequences."""
    B, T = attention_mask.shape
    ids = attention_mask.reshape(-1)
    index = (ids != 0).nonzero().squeeze(1)  # [N]
    N = index.shape[0]
    if N == 0:
        raise ValueError("attention_mask masks every token (no non-zero entry)")
    kept_ids, rows = ids[index], torch.div(index, T, rounding_mode="floor")
    starts = torch.ones(N, dtype=torch.bool, device=ids.device)
    starts[1:] = (kept_ids[1:] != kept_ids[:-1]) | (rows[1:] != rows[:-1])
    start_at = starts.nonzero().squeeze(1)  # [S]
    cu_seqlens = torch.cat([start_at, start_at.new_tensor([N])]).to(torch.int32)
    seq_of = torch.cumsum(starts.long(), 0) - 1  # [N]
    positions = torch.arange(N, device=ids.device) - start_at[seq_of]
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    nxt = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    nxt[:, :-1] = (attention_mask[:, 1:] != 0) & (attention_mask[:, 1:] == attention_mask[:, :-1])
    return Packing(index, cu_seqlens, max_seqlen, positions[None], nxt)


def shift_labels(labels: torch.Tensor, valid_next: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF convention: position t is trained to predict ``labels[:, t + 1]``; the last one predicts nothing."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if valid_next is not None:
        shifted = shifted.masked_fill(~valid_next, IGNORE_INDEX)
    return shifted


class DecoderLayer(nn.Module):
    """One pre-norm block; ``forward(x, residual)`` → ``(mlp_out, residual)`` (the stream before the add)."""

    def __init__(self, config: Baichuan2Config, *, device=None, dtype=None):
        super().__init__()
        be, D = config.backends(), config.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps, backend=be, **kw)
        self.self_attn = Attention(D, config.num_heads, pos_emb=config.pos_emb, backend=be, **kw)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps, backend=be, **kw)
        self.mlp = SwiGLU(D, config.intermediate_size, backend=be, **kw)

    def forward(self, x, residual=None, **attn_kwargs):
        if residual is None:  # first layer: x is the embedding itself
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual=residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, **attn_kwargs), residual=residual)
        return self.mlp(h), residual


class BaichuanModel(nn.Module):
    """The ``model.*`` part of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: Baichuan2Config, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, **kw) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backends(), **kw)


class Baichuan2(nn.Module):
    """Baichuan 2 causal LM. Build on ``torch.device("meta")`` and call :meth:`materialize` to
    allocate and initialise one layer at a time (the full 7B/13B never needs two copies)."""

    def __init__(self, config: Baichuan2Config, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        be = config.backends()
        self.model = BaichuanModel(config, device=device, dtype=dtype)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, normalize=config.norm_head, backend=be,
                                device=device, dtype=dtype)
        self.loss_backend = backend_for(be, "linear_cross_entropy")
        self.rotary = self.alibi = None
        if config.pos_emb == "rope":
            self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                          backend=be)
        else:
            with torch.device("cpu"):  # the slopes are CPU fp32, moved lazily (also under a meta context)
                self.alibi = AlibiSlopes(config.num_heads, backend=be)
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ----------------------------------------------------------------------------------- weights
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _parts(self) -> list[nn.Module]:
        return [self.model.embed_tokens, *self.model.layers, self.model.norm, self.lm_head]

    @torch.no_grad()
    def _init_part(self, part: nn.Module) -> None:
        """Spec §2: Linear/Embedding N(0, 0.02), pad row 0, RMSNorm ones, NormHead kaiming_uniform(√5)."""
        std = self.config.initializer_range
        for m in part.modules():
            if isinstance(m, NormHead):
                m.reset_parameters()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def init_weights(self) -> None:
        """(Re-)initialise every parameter in place, per the spec."""
        for part in self._parts():
            self._init_part(part)

    def materialize(self, device="cpu", dtype: Optional[torch.dtype] = None, *, init: bool = True) -> "Baichuan2":
        """Allocate a meta-built model on ``device`` (in ``dtype``) one part at a time; ``init=False``
        leaves the storage uninitialised (for a checkpoint load that overwrites every tensor)."""
        for part in self._parts():
            if dtype is not None:
                part.to(dtype)  # free on meta
            part.to_empty(device=device)
            if init:
                self._init_part(part)
        return self

    # ----------------------------------------------------------------------------------- forward
    def _position_kwargs(self, n_positions: int, device, position_ids=None) -> dict:
        if self.rotary is not None:
            cos, sin = self.rotary(n_positions, device)
            return dict(cos=cos, sin=sin, position_ids=position_ids)
        return dict(alibi_slopes=self.alibi(device))

    def _backbone(self, h: torch.Tensor, caches=None, **attn_kwargs) -> torch.Tensor:
        residual = None
        for i, layer in enumerate(self.model.layers):
            cache = None if caches is None else caches[i]
            h, residual = layer(h, residual, cache=cache, **attn_kwargs)
        return self.model.norm(h, residual=residual)[0]

    def forward(self, input_ids: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> Baichuan2Output:
        """``input_ids [B, T]`` → ``.logits [B, T, V]``, or with ``labels [B, T]`` (-100 = ignore)
        ``.loss/.ce/.z`` through ``bk.linear_cross_entropy`` (no full logits). ``position_ids [B, T]``
        (RoPE, dense batches only) override the default ``0..T-1``."""
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an int [B, T] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        for name, t in (("labels", labels), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have the shape of input_ids {(B, T)}, got {tuple(t.shape)}")
        device = input_ids.device
        if attention_mask is None:
            n_pos = T if position_ids is None else int(position_ids.max()) + 1
            h = self.model.embed_tokens(input_ids)  # [B, T, D]
            h = self._backbone(h, **self._position_kwargs(n_pos, device, position_ids))  # [B, T, D]
            hidden = h.reshape(B * T, -1)  # [N, D]
            targets = None if labels is None else shift_labels(labels).reshape(-1)
            pack = None
        else:
            if position_ids is not None:
                raise ValueError("pass either attention_mask (positions derived from it) or position_ids, not both")
            pack = pack_attention_mask(attention_mask)
            h = self.model.embed_tokens(input_ids.reshape(-1)[pack.index])[None]  # [1, N, D]
            kw = self._position_kwargs(pack.max_seqlen, device, pack.position_ids)
            h = self._backbone(h, cu_seqlens=pack.cu_seqlens, max_seqlen=pack.max_seqlen, **kw)
            hidden = h[0]  # [N, D]
            targets = None if labels is None else shift_labels(labels, pack.next_in_seq).reshape(-1)[pack.index]
        if targets is not None:
            w = self.lm_head.weight
            loss, ce, z = bk.linear_cross_entropy(
                hidden, w if w.dtype == hidden.dtype else w.to(hidden.dtype), targets,
                norm_head=self.config.norm_head, z_loss_weight=self.config.z_loss_weight,
                ignore_index=IGNORE_INDEX, backend=self.loss_backend)
            return Baichuan2Output(loss=loss, ce=ce, z=z)
        logits = self.lm_head(hidden)  # [N, V]
        if pack is not None:
            full = logits.new_zeros(B * T, logits.shape[-1])
            logits = full.index_copy(0, pack.index, logits)
        return Baichuan2Output(logits=logits.view(B, T, -1))

    # -------------------------------------------------------------------------------- generation
    def new_kv_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> "KVCache":
        p = self.lm_head.weight
        return KVCache.allocate(self.config, batch_size, max_len, device=device or p.device, dtype=dtype or p.dtype)

    @torch.no_grad()
    def prefill(self, prompts: list[torch.Tensor], cache: "KVCache") -> torch.Tensor:
        """Run prompts (1-D token tensors, lengths may differ) as packed sequences into an empty cache;
        returns the next-token logits ``[B, V]``. Cache rows are left-aligned: row b holds positions
        ``0 .. len_b - 1``, so no padding enters attention."""
        device = cache.k[0].device
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        if len(prompts) != cache.batch_size or int(lengths.min()) < 1:
            raise ValueError("prefill needs one non-empty prompt per cache row")
        if int(lengths.max()) > cache.max_len:
            raise ValueError(f"a prompt of {int(lengths.max())} tokens does not fit the cache ({cache.max_len})")
        ids = torch.cat([p.to(device) for p in prompts])  # [N]
        cu = torch.zeros(len(prompts) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths, 0)
        rows = torch.repeat_interleave(torch.arange(len(prompts), device=device), lengths)  # [N]
        cols = torch.arange(ids.shape[0], device=device) - cu[:-1].long()[rows]  # [N]
        max_len = int(lengths.max())
        kw = self._position_kwargs(cache.max_len, device, cols[None])
        caches = [(k, v, rows, cols, None) for k, v in zip(cache.k, cache.v)]
        h = self._backbone(self.model.embed_tokens(ids)[None], caches, cu_seqlens=cu, max_seqlen=max_len, **kw)
        cache.seqlens = lengths.to(torch.int32)
        return self.lm_head(h[0, cu[1:].long() - 1])  # [B, V]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: "KVCache") -> torch.Tensor:
        """Append one token per row (``tokens [B]``) and return the next-token logits ``[B, V]``."""
        B = cache.batch_size
        if int(cache.seqlens.max()) >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions)")
        cols = cache.seqlens.long()  # [B]: the new token's position
        rows = torch.arange(B, device=cols.device)
        new_lens = cache.seqlens + 1
        kw = self._position_kwargs(cache.max_len, cols.device, cols[:, None])
        caches = [(k, v, rows, cols, new_lens) for k, v in zip(cache.k, cache.v)]
        h = self._backbone(self.model.embed_tokens(tokens.reshape(B, 1)), caches, **kw)  # [B, 1, D]
        cache.seqlens = new_lens
        return self.lm_head(h[:, 0])


@dataclass
class KVCache:
    """Preallocated per-layer caches ``k[i], v[i]: [B, S_max, H, Dh]`` and valid lengths ``[B]`` (int32)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: torch.Tensor

    @classmethod
    def allocate(cls, config: Baichuan2Config, batch_size: int, max_len: int, *, device, dtype) -> "KVCache":
        shape = (batch_size, max_len, config.num_heads, config.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        return cls(k, v, torch.zeros(batch_size, dtype=torch.int32, device=device))

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]
