"""The split of one model call over ranks (stages/parallel.py), against the one-process computation:
the attention pieces against plain softmax attention, and the DiT forward of a random
Wan-architecture model computed by real Ray actors in gloo groups of 2 and 4 ranks (started and
joined by cascade/groups.py) against the same model's forward in this process."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cascade.config import FrameParallelConfig, Resources
from cascade.groups import GroupMember, join_groups, start_group, stop_group
from stages.base.dit import WanDiT, WanDiTConfig
from stages.parallel import (
    attention_with_lse,
    dit_rank_layout,
    merge_attention,
    split_evenly,
    subgroup_members,
)

EQUIVALENCE_TOLERANCE = 1e-5  # max |parallel − one process| / max |one process|, float32

# 4 heads (Ulysses 2 and 4 divide them), 2 blocks; text of 8 tokens
SMALL_DIT = WanDiTConfig(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=16, text_len=8, freq_dim=32)
# latent token grids (T', H', W') after the 1x2x2 patch: 32 tokens divide 2 and 4 ranks, 27 and 15 do not
GRIDS = {"divides": (2, 4, 4), "pads": (3, 3, 3), "pads-more": (1, 3, 5)}


def reference_attention(q, k, v):
    """Plain softmax attention and the log-sum-exp of the scores, (B, L, H, D) layout."""
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / q.shape[-1] ** 0.5
    out = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double())
    return out, scores.logsumexp(-1).transpose(1, 2)


def test_attention_with_lse_is_softmax_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, length, 3, 8, generator=generator) for length in (11, 17, 17))
    out, lse = attention_with_lse(q, k, v)
    expected_out, expected_lse = reference_attention(q, k, v)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-6)


def test_attention_with_lse_chunks_queries(monkeypatch):
    """Queries in chunks of one give the same result as all at once."""
    import stages.parallel

    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, length, 2, 8, generator=generator) for length in (9, 13, 13))
    whole = attention_with_lse(q, k, v)
    monkeypatch.setattr(stages.parallel, "ATTENTION_CHUNK_BYTES", 1)
    chunked = attention_with_lse(q, k, v)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_merging_key_blocks_gives_attention_over_all_keys():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 2, 8, generator=generator)
    k, v = (torch.randn(2, 20, 2, 8, generator=generator) * 3 for _ in range(2))  # large scores: needs stability
    out, lse = attention_with_lse(q, k[:, :6], v[:, :6])
    for start, stop in ((6, 13), (13, 20)):
        out, lse = merge_attention(out, lse, *attention_with_lse(q, k[:, start:stop], v[:, start:stop]))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), reference_attention(q, k, v)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count, parts", [(10, 3), (3, 5), (0, 2), (8, 8), (49, 4)])
def test_split_evenly_covers_in_order(count, parts):
    ranges = split_evenly(count, parts)
    assert len(ranges) == parts and [i for part in ranges for i in part] == list(range(count))
    lengths = [len(part) for part in ranges]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("ulysses, ring, cfg", [(2, 2, 2), (4, 1, 2), (1, 3, 2), (2, 3, 1)])
def test_subgroups_partition_the_ranks(ulysses, ring, cfg):
    world = ulysses * ring * cfg
    for varying, size in ((2, ulysses), (1, ring), (0, cfg)):
        groups = subgroup_members(world, ulysses, ring, varying)
        assert sorted(rank for group in groups for rank in group) == list(range(world))
        for group in groups:
            assert len(group) == size
            layouts = [dit_rank_layout(rank, ulysses, ring) for rank in group]
            assert [layout[varying] for layout in layouts] == list(range(size))  # member index = coordinate
            assert len({tuple(v for axis, v in enumerate(layout) if axis != varying) for layout in layouts}) == 1


# --------------------------------------------------------------------------------------------------
# The DiT forward over real ranks


def random_dit(seed: int = 0) -> WanDiT:
    """SMALL_DIT with every parameter random (also those Wan initialises to zero or one), the same
    in every process."""
    model = WanDiT(SMALL_DIT).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1 + 0.1 * noise)
            elif "modulation" in name or parameter.ndim == 1:
                parameter.copy_(0.5 * noise)
            else:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)  # 1 / sqrt(fan in)
    return model


def dit_inputs(grid: tuple[int, int, int], seed: int = 1):
    """A guidance pair: the same latents twice, two timesteps' worth of different text."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, grid[0], grid[1] * 2, grid[2] * 2, generator=generator).repeat(2, 1, 1, 1, 1)
    timestep = torch.tensor([777.0, 777.0])
    text = torch.randn(2, SMALL_DIT.text_len, SMALL_DIT.text_dim, generator=generator)
    return latents, timestep, text


class DiTRank(GroupMember):
    """One rank of a test group: joins the group, then computes the split forward on request."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        torch.set_num_threads(1)
        self.rank, self.world_size, self.device = rank, world_size, "cpu"

    def start(self, address, peers) -> int:
        self.join_group(*address)
        self.model = random_dit()
        self.compiled_model = None
        return self.rank

    def forward(self, ulysses: int, ring: int, cfg: int, grid: tuple[int, int, int], compiled: bool = False) -> np.ndarray:
        from stages.parallel import make_dit_parallel

        model = self.model
        if compiled:
            if self.compiled_model is None:
                self.compiled_model = random_dit()
                self.compiled_model.compile_blocks()
            model = self.compiled_model
        parallel = make_dit_parallel(ulysses, ring, cfg)
        with torch.no_grad():
            return parallel.forward(model, *dit_inputs(grid)).numpy()

    def compiled_graphs(self) -> int:
        """How many graphs torch.compile has made in this process."""
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def rank_groups(ray_cluster):
    """A gloo group of 2 and one of 4 ranks, joined once for every case."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    groups = {f"{size} ranks": start_group(DiTRank, Resources(num_cpus=1), FrameParallelConfig(size))
              for size in (2, 4)}
    assert join_groups(groups) == {"2 ranks": [0, 1], "4 ranks": [0, 1, 2, 3]}
    yield {len(group.ranks): group for group in groups.values()}
    for group in groups.values():
        stop_group(group)


@pytest.fixture(scope="module")
def one_process_outputs():
    model = random_dit()
    with torch.no_grad():
        return {name: model(*dit_inputs(grid)).numpy() for name, grid in GRIDS.items()}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("ulysses, ring, cfg", [(2, 1, 1), (4, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2)],
                         ids=["ulysses2", "ulysses4", "ring2", "ulysses2-ring2", "cfg2", "ulysses2-cfg2"])
def test_split_dit_forward_equals_one_process(rank_groups, one_process_outputs, ulysses, ring, cfg, grid):
    import ray

    group = rank_groups[ulysses * ring * cfg]
    outputs = ray.get([rank.forward.remote(ulysses, ring, cfg, GRIDS[grid]) for rank in group.ranks])
    expected = one_process_outputs[grid]
    for output in outputs:  # every rank ends with the whole velocity
        assert output.shape == expected.shape
        assert np.abs(output - expected).max() / np.abs(expected).max() < EQUIVALENCE_TOLERANCE
    if ulysses * ring > 1 and GRIDS[grid] != GRIDS["divides"]:
        assert np.prod(GRIDS[grid]) % (ulysses * ring)  # the case really pads


@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_split_dit_forward_with_compiled_blocks_equals_one_process(rank_groups, one_process_outputs, ulysses, ring):
    """torch.compile'd blocks (stages.base.compile) around the eager collectives of the split."""
    import ray

    group = rank_groups[ulysses * ring]
    outputs = ray.get([rank.forward.remote(ulysses, ring, 1, GRIDS["pads"], compiled=True) for rank in group.ranks])
    expected = one_process_outputs["pads"]
    for output in outputs:
        assert np.abs(output - expected).max() / np.abs(expected).max() < EQUIVALENCE_TOLERANCE
    assert all(count > 0 for count in ray.get([rank.compiled_graphs.remote() for rank in group.ranks]))
