"""Multi-head attention kernels: flash-attn when it is importable and the inputs suit it, torch SDPA
otherwise. Both compute the same softmax(q kᵀ / √d) v; the choice is logged once."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # flash-attn exists only on GPU machines with the `gpu` extra installed
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

_logged: set[str] = set()


def _log_choice(backend: str) -> None:
    if torch.compiler.is_compiling():  # inside a compiled block (WanDiT.compile_blocks) a log call breaks the graph
        return
    if backend not in _logged:
        _logged.add(backend)
        log.info("attention backend: %s", backend)


def attention_backend(q: torch.Tensor) -> str:
    """The backend `attention` uses for a query like `q`."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash-attn"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim) -> (B, Lq, heads, head_dim)."""
    backend = attention_backend(q)
    _log_choice(backend)
    if backend == "flash-attn":
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
