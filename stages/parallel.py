"""One model call computed by several ranks of a torch.distributed group: the math and the
collectives, no Ray (cascade/groups.py starts the processes and joins them into a group).

Three splits, each a few small functions with its collective named and its shapes in the docstring:

- **Sequence parallelism for the DiT.** The video tokens are cut into one contiguous shard per rank
  (padded at the end to divide evenly). Everything in a block but self-attention acts on a token by
  itself, so it runs on the local shard unchanged. Self-attention composes two schemes as USP does
  (Fang & Zhao 2024): *Ulysses* (Jacobs et al. 2023), an all-to-all inside a group of U ranks that
  turns "my tokens, all heads" into "the group's tokens, my H/U heads", and *ring attention* (Liu et
  al. 2023), which passes the key/value blocks of R such groups around a ring and merges each
  block's partial result with a stable log-sum-exp. Padding is kept out of attention by cutting
  each key/value block to its real tokens.
- **CFG parallelism.** The guidance batch [conditional; unconditional] is split over two halves of
  the group and reassembled with an all-gather.
- **Frame ranges for tsr and ssr.** The leader (rank 0) sends each rank a contiguous range of
  frames, every rank computes its range, the leader receives and concatenates the results.

Rank layout of a DiT group of U·R·C ranks: rank = c·(R·U) + r·U + u. Ranks with the same (c, r)
form a Ulysses group, the same (c, u) a ring, the same (r, u) a CFG pair; the first R·U ranks
compute the conditional branch, and the sequence shard of rank (r, u) is number r·U + u.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from stages.attention import attention

ATTENTION_CHUNK_BYTES = 64 * 2**20  # bound on the float32 scores of one query chunk in attention_with_lse
MAX_DIMS = 8  # tensors sent with a shape header have at most this many dimensions


@dataclass(frozen=True)
class RankGroup:
    """This process's place in a group of ranks: its index, the group's size, the torch.distributed
    group (None: the default group of the process), and the device its collectives use."""

    rank: int
    size: int
    group: Optional[dist.ProcessGroup] = None
    device: torch.device = torch.device("cpu")

    def global_rank(self, index: int) -> int:
        """The default-group rank of member `index`, as point-to-point calls need it."""
        return index if self.group is None else dist.get_global_rank(self.group, index)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


SINGLE_RANK = RankGroup(0, 1)


def world_ranks(device: torch.device | str = "cpu") -> RankGroup:
    """The default group this process joined (cascade/groups.py does the joining)."""
    return RankGroup(dist.get_rank(), dist.get_world_size(), None, torch.device(device))


# --------------------------------------------------------------------------------------------------
# Attention over key/value blocks: a partial result with its log-sum-exp, and the merge


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ/√d) v and the log-sum-exp of each query's scores, in float32.

    q (B, Lq, H, D), k and v (B, Lk, H, D) -> out (B, Lq, H, D), lse (B, Lq, H). Queries go in chunks
    so the scores never take more than ATTENTION_CHUNK_BYTES (twice that while the log-sum-exp is
    formed); the scores become the probabilities in place."""

    def heads_first(t: Tensor) -> Tensor:  # (B, L, H, D) -> a contiguous float32 copy (B, H, L, D)
        batch, length, heads, head_dim = t.shape
        return torch.empty(batch, heads, length, head_dim, dtype=torch.float32, device=t.device).copy_(t.transpose(1, 2))

    q, k, v = heads_first(q).mul_(q.shape[-1] ** -0.5), heads_first(k), heads_first(v)
    batch, heads, _, _ = q.shape
    chunk = max(1, ATTENTION_CHUNK_BYTES // (4 * batch * heads * k.shape[2]))
    outs, lses = [], []
    for q_chunk in q.split(chunk, dim=2):
        scores = q_chunk @ k.transpose(-1, -2)  # (B, H, chunk, Lk)
        lse = scores.logsumexp(dim=-1)  # (B, H, chunk)
        outs.append(scores.sub_(lse[..., None]).exp_() @ v)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2), torch.cat(lses, dim=2).transpose(1, 2)


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint key sets -> attention over their union: each result is weighted by
    its share of the softmax mass, exp(lse_i − lse), with lse = log(exp lse_1 + exp lse_2).

    out, block_out (B, L, H, D) float32, both overwritten (the merged result is `out`); lse,
    block_lse (B, L, H)."""
    merged_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - merged_lse)[..., None]).add_(block_out.mul_(torch.exp(block_lse - merged_lse)[..., None]))
    return out, merged_lse


# --------------------------------------------------------------------------------------------------
# Collectives of sequence parallelism


def all_to_all_heads(x: Tensor, ulysses: RankGroup) -> Tensor:
    """Ulysses, forward: (B, S, H, D) = my S tokens of all heads -> (B, U·S, H/U, D) = the U·S tokens
    of the group (in rank order) of my H/U heads. One all-to-all, sending (U−1)/U of x."""
    batch, tokens, heads, head_dim = x.shape
    size = ulysses.size
    send = x.reshape(batch, tokens, size, heads // size, head_dim).permute(2, 0, 1, 3, 4).contiguous()  # part j -> rank j
    received = torch.empty_like(send)  # part j: rank j's tokens of my heads
    dist.all_to_all_single(received, send, group=ulysses.group)
    del send  # free before the copy below: activation memory is what limits a rank
    return received.permute(1, 0, 2, 3, 4).reshape(batch, size * tokens, heads // size, head_dim)


def all_to_all_tokens(x: Tensor, ulysses: RankGroup) -> Tensor:
    """Ulysses, back: (B, U·S, H/U, D) -> (B, S, H, D), the inverse of `all_to_all_heads`."""
    batch, group_tokens, heads_here, head_dim = x.shape
    size = ulysses.size
    tokens = group_tokens // size
    send = x.reshape(batch, size, tokens, heads_here, head_dim).transpose(0, 1).contiguous()  # part j: rank j's tokens
    received = torch.empty_like(send)  # part j: my tokens of rank j's heads
    dist.all_to_all_single(received, send, group=ulysses.group)
    del send
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens, size * heads_here, head_dim)


def pass_to_next(tensors: list[Tensor], ring: RankGroup) -> Callable[[], list[Tensor]]:
    """Ring step: starts sending `tensors` to the next rank of the ring and receiving the previous
    rank's tensors of the same shapes; returns a function that waits and gives the received ones."""
    received = [torch.empty_like(tensor) for tensor in tensors]
    next_rank = ring.global_rank((ring.rank + 1) % ring.size)
    previous_rank = ring.global_rank((ring.rank - 1) % ring.size)
    works = dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, tensor, next_rank, ring.group) for tensor in tensors]
        + [dist.P2POp(dist.irecv, buffer, previous_rank, ring.group) for buffer in received]
    )

    def wait() -> list[Tensor]:
        for work in works:
            work.wait()
        return received

    return wait


def ring_attention(q: Tensor, k: Tensor, v: Tensor, valid: list[int], ring: RankGroup) -> Tensor:
    """Attention of my queries over the key/value blocks of every rank of the ring.

    q (B, Lq, H, D); k, v (B, Lb, H, D): this rank's block. Block j (of ring rank j) holds `valid[j]`
    real tokens followed by padding. R − 1 steps pass (k, v) to the next rank while this one attends
    to the block it holds; partial results merge by log-sum-exp. Returns (B, Lq, H, D) in q's dtype."""
    out = lse = None
    for step in range(ring.size):
        receive = pass_to_next([k, v], ring) if step < ring.size - 1 else None
        count = valid[(ring.rank - step) % ring.size]  # the block now held came from that ring rank
        if count > 0:
            block_out, block_lse = attention_with_lse(q, k[:, :count], v[:, :count])
            out, lse = (block_out, block_lse) if out is None else merge_attention(out, lse, block_out, block_lse)
        if receive is not None:
            k, v = receive()
    return out.to(q.dtype)  # block 0 always holds a real token, so out is set


def gather_tokens(x: Tensor, group: RankGroup, dim: int = 1) -> Tensor:
    """All-gather: every rank's piece of x, concatenated in rank order along `dim`, on every rank."""
    if group.size == 1:
        return x
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(pieces, x, group=group.group)
    return torch.cat(pieces, dim=dim)


@dataclass(frozen=True)
class SequenceParallel:
    """The sequence split of one DiT call over `ulysses.size · ring.size` ranks."""

    ulysses: RankGroup
    ring: RankGroup

    @property
    def size(self) -> int:
        return self.ulysses.size * self.ring.size

    @property
    def shard_index(self) -> int:
        return self.ring.rank * self.ulysses.size + self.ulysses.rank

    def shard_length(self, length: int) -> int:
        return math.ceil(length / self.size)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's piece of `x` along `dim`, as if `dim` were zero-padded to a multiple of the
        group size: (…, L, …) -> (…, ⌈L/P⌉, …). A view of x, unless the piece needs padding."""
        length = x.shape[dim]
        piece = self.shard_length(length)
        start = min(self.shard_index * piece, length)
        real = min(piece, length - start)
        part = x.narrow(dim, start, real)
        if real == piece:
            return part
        return torch.cat([part, x.new_zeros(*x.shape[:dim], piece - real, *x.shape[dim + 1:])], dim=dim)

    def gather(self, x: Tensor, length: int, dim: int = 1) -> Tensor:
        """The inverse of `shard`: every rank's piece, in sequence order, padding dropped."""
        whole = gather_tokens(gather_tokens(x, self.ulysses, dim), self.ring, dim)
        return whole.narrow(dim, 0, length)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, length: int) -> Tensor:
        """Self-attention of the whole sequence of `length` real tokens, from and to the shards.

        q, k, v (B, S, H, D): this rank's shard (rotary embedding applied) -> (B, S, H, D)."""
        if self.ulysses.size > 1:  # one all-to-all each: a third of the memory of one on (q, k, v)
            q, k, v = (all_to_all_heads(t, self.ulysses) for t in (q, k, v))  # (B, U·S, H/U, D)
        block = q.shape[1]  # tokens per ring block: the Ulysses group's tokens
        valid = [min(max(length - index * block, 0), block) for index in range(self.ring.size)]
        if self.ring.size > 1:
            out = ring_attention(q, k, v, valid, self.ring)
        else:
            out = attention(q, k[:, :valid[0]], v[:, :valid[0]])
        del q, k, v  # the head layout is not needed on the way back: free it first
        return all_to_all_tokens(out, self.ulysses) if self.ulysses.size > 1 else out


# --------------------------------------------------------------------------------------------------
# The DiT's group: sequence parallelism inside each branch, CFG parallelism across the branches


@dataclass(frozen=True)
class DiTParallel:
    """A DiT call split over a group of ulysses·ring·cfg ranks (the whole default group)."""

    world: RankGroup
    sequence: SequenceParallel
    cfg: RankGroup

    def forward(self, model: Callable[..., Tensor], latents: Tensor, timestep: Tensor, text: Tensor) -> Tensor:
        """model(latents, timestep, text, sequence=...) computed by the group; every rank returns the
        whole result. With cfg = 2 the batch is the guidance pair [conditional; unconditional]: each
        half of the group computes one branch, an all-gather puts the pair back together."""
        if self.cfg.size == 1:
            return model(latents, timestep, text, sequence=self.sequence)
        parts = [t.chunk(self.cfg.size)[self.cfg.rank] for t in (latents, timestep, text)]
        return gather_tokens(model(*parts, sequence=self.sequence), self.cfg, dim=0)

    def broadcast(self, tensor: Optional[Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The leader's `tensor` on every rank (others pass None and the shape and dtype to expect)."""
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=self.world.device)
        tensor = tensor.to(self.world.device).contiguous()
        dist.broadcast(tensor, src=0)
        return tensor


def dit_rank_layout(rank: int, ulysses: int, ring: int) -> tuple[int, int, int]:
    """(cfg index, ring index, ulysses index) of a rank: rank = c·(R·U) + r·U + u."""
    return rank // (ring * ulysses), (rank // ulysses) % ring, rank % ulysses


def subgroup_members(world_size: int, ulysses: int, ring: int, varying: int) -> list[list[int]]:
    """Every subgroup of one kind, in order of its first rank: the ranks whose layout coordinates
    agree on all but coordinate `varying` (0: cfg, 1: ring, 2: ulysses)."""
    groups: dict[tuple, list[int]] = {}
    for rank in range(world_size):
        coordinates = list(dit_rank_layout(rank, ulysses, ring))
        coordinates[varying] = None
        groups.setdefault(tuple(coordinates), []).append(rank)
    return list(groups.values())


def make_dit_parallel(ulysses: int, ring: int, cfg: int, device: torch.device | str = "cpu") -> DiTParallel:
    """Creates the Ulysses, ring and CFG subgroups of the default group. Every rank of the group must
    call this with the same sizes (subgroups are created collectively, in one order)."""
    world = world_ranks(device)
    if ulysses * ring * cfg != world.size:
        raise ValueError(f"ulysses·ring·cfg = {ulysses}·{ring}·{cfg} must equal the group's {world.size} ranks")
    groups = {}
    for kind, varying, size in (("ulysses", 2, ulysses), ("ring", 1, ring), ("cfg", 0, cfg)):
        if size == 1:
            groups[kind] = RankGroup(0, 1, None, world.device)
            continue
        for members in subgroup_members(world.size, ulysses, ring, varying):
            handle = dist.new_group(members)  # collective: every rank creates every subgroup
            if world.rank in members:
                groups[kind] = RankGroup(members.index(world.rank), size, handle, world.device)
    return DiTParallel(world, SequenceParallel(groups["ulysses"], groups["ring"]), groups["cfg"])


# --------------------------------------------------------------------------------------------------
# Frame ranges for tsr and ssr


def split_evenly(count: int, parts: int) -> list[range]:
    """`count` items as `parts` contiguous ranges whose lengths differ by at most one (the first
    ranges take the remainder; a range is empty when parts > count)."""
    base, extra = divmod(count, parts)
    starts = [index * base + min(index, extra) for index in range(parts + 1)]
    return [range(starts[index], starts[index + 1]) for index in range(parts)]


def send_tensor(tensor: Tensor, destination: int, ranks: RankGroup) -> None:
    """Point to point: a shape header, then the data (the receiver needs to know only the dtype)."""
    header = torch.full((MAX_DIMS + 1,), -1, dtype=torch.int64, device=ranks.device)
    header[0] = tensor.dim()
    header[1:tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.send(header, ranks.global_rank(destination), group=ranks.group)
    dist.send(tensor.to(ranks.device).contiguous(), ranks.global_rank(destination), group=ranks.group)


def receive_tensor(source: int, dtype: torch.dtype, ranks: RankGroup) -> Tensor:
    """The tensor `send_tensor` sent from `source`."""
    header = torch.empty(MAX_DIMS + 1, dtype=torch.int64, device=ranks.device)
    dist.recv(header, ranks.global_rank(source), group=ranks.group)
    tensor = torch.empty(header[1:int(header[0]) + 1].tolist(), dtype=dtype, device=ranks.device)
    dist.recv(tensor, ranks.global_rank(source), group=ranks.group)
    return tensor


def broadcast_shape(shape: Optional[tuple[int, ...]], ranks: RankGroup) -> tuple[int, ...]:
    """The leader's `shape` on every rank (the others pass None)."""
    if ranks.size == 1:
        return tuple(shape)
    header = torch.full((MAX_DIMS + 1,), -1, dtype=torch.int64, device=ranks.device)
    if ranks.is_leader:
        header[0] = len(shape)
        header[1:len(shape) + 1] = torch.tensor(shape, dtype=torch.int64)
    dist.broadcast(header, ranks.global_rank(0), group=ranks.group)
    return tuple(header[1:int(header[0]) + 1].tolist())


def map_frame_ranges(
    compute: Callable[[Tensor, int], Tensor],
    frames: Optional[Tensor],
    inputs: list[range],
    dim: int,
    dtype: torch.dtype,
    ranks: RankGroup,
) -> Optional[Tensor]:
    """Splits a computation over frame ranges: the leader sends rank k `frames` narrowed to
    `inputs[k]` along `dim`, every rank with a non-empty range runs compute(its frames, k), and the
    leader returns the results concatenated along `dim` in rank order (others return None).

    frames: the leader's tensor (None on the other ranks); `dtype`: that of the frames and results."""
    if ranks.is_leader:
        for index in range(1, ranks.size):
            if len(inputs[index]):
                send_tensor(frames.narrow(dim, inputs[index].start, len(inputs[index])), index, ranks)
        mine = frames.narrow(dim, inputs[0].start, len(inputs[0]))
    elif len(inputs[ranks.rank]):
        mine = receive_tensor(0, dtype, ranks)
    else:
        return None
    result = compute(mine, ranks.rank)
    if not ranks.is_leader:
        send_tensor(result, 0, ranks)
        return None
    pieces = [result] + [receive_tensor(index, dtype, ranks) for index in range(1, ranks.size) if len(inputs[index])]
    return result if len(pieces) == 1 else torch.cat(pieces, dim=dim)  # one piece: no second copy of a long clip

