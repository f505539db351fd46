"""A small character-level GPT: the model of the ``shakespeare`` task.

Pre-LayerNorm blocks (Radford et al. 2019; nanoGPT): ``x + attn(ln_1(x))``, then
``x + mlp(ln_2(x))``, causal multi-head self-attention, a 4x GELU MLP, learned token and
position embeddings, a final LayerNorm and a linear head. No dropout: a run is deterministic
and every example's gradient well defined.

The head is NOT tied to the token embedding. A tie through modules (``head.weight =
tokens.weight``) is exact for ``per_example``, but the shared weight's per-example gradients
are then materialised and summed before the norm (:mod:`noisescale.per_example.plan`); untied,
every layer stays on the kernels' fast norm path, which keeps ``per_example`` cheap here. The
position embedding is an ``nn.Embedding`` called with ``[B, T]`` positions, so that dim 0 of
every layer's input indexes the examples, as the per-example kernels need.

Shape letters: ``B`` sequences, ``T`` positions, ``D`` width, ``H`` heads, ``V`` vocabulary.

References:
    Vaswani et al. (2017), Attention Is All You Need, arXiv:1706.03762.
    Radford et al. (2019), Language Models are Unsupervised Multitask Learners (GPT-2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharTransformer", "lm_loss"]

_INIT_STD = 0.02  # GPT-2's initialisation of every weight matrix


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, D/H]
            for z in self.qkv(x).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # [B, T, D]


class _Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """A GPT over characters: ``[B, T]`` token ids to ``[B, T, V]`` next-token logits.

    Args:
        vocabulary: V, distinct tokens.
        context: the longest sequence, positions.
        width: D, the embedding width.
        depth: transformer blocks.
        heads: attention heads (dividing ``width``).

    Example:
        >>> model = CharTransformer(vocabulary=10, context=8, width=16, depth=1, heads=2)
        >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 10])
    """

    def __init__(self, vocabulary: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # residual projections scaled down with depth (GPT-2, section 2.3)
                scale = 1 / math.sqrt(2 * depth) if name.endswith(("proj.weight", "mlp.2.weight")) else 1
                nn.init.normal_(p, std=_INIT_STD * scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids to ``[B, T, V]`` logits of the next token at every position."""
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)  # [B, T]: dim 0 indexes the sequences
        h = self.tokens(ids) + self.positions(pos)  # [B, T, D]
        return self.head(self.ln_f(self.blocks(h)))  # [B, T, V]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats, the MEAN over every predicted token of the batch.

    Args:
        logits: ``[B, T, V]``.
        targets: ``[B, T]`` next-token ids.

    Returns:
        0-d loss: a batch of ``b`` sequences of ``T`` tokens is a batch of ``b T`` tokens.
    """
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
