"""What a rank of a split DiT holds and sends (issue: a stage on several GPUs), and the tiny cascade's
time with a split base stage.

    python bench/bench_parallel.py            # all three tables (about 10 minutes on 2 cores)
    python bench/bench_parallel.py --skip-cascade

1. Computed from the shapes, for Wan2.1-1.3B and 14B at 480p and 720p, 81 frames, bf16, guidance
   batch 2: per rank, the peak activation memory of a DiT forward and the bytes each all-to-all and
   ring step moves, at 1, 2, 4 and 8 ranks (`activation_bytes`, `communication_bytes`).
2. Measured on the CPU at a reduced size, to confirm the formulas: the same forward run by real
   ranks (Ray actors in a gloo group, started by cascade/groups.py) under torch's profiler, whose
   allocator events give the live bytes at every moment (peak = their running maximum, weights and
   inputs excluded); the collectives are wrapped to count the bytes each rank receives.
3. The tiny cascade's wall time with the base stage on 1 and on 2 ranks (CPU, local Ray).

Both memory and formula count tensors only: kernel workspaces (SDPA's, oneDNN's) are outside both.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from cascade.groups import GroupMember  # noqa: E402
from stages.base.dit import WAN_DIT_SIZES, WanDiTConfig  # noqa: E402
from stages.parallel import ATTENTION_CHUNK_BYTES  # noqa: E402

GiB, MiB = 2**30, 2**20
TEXT_TOKENS = 512
FORWARDS = 3  # profiled forwards per layout: gloo frees some buffers late, so peaks vary a little


@dataclass(frozen=True)
class Layout:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def ranks(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    def __str__(self) -> str:
        parts = [f"{name} {size}" for name, size in (("U", self.ulysses), ("R", self.ring), ("C", self.cfg)) if size > 1]
        return " × ".join(parts) or "1 rank"


def video_tokens(config: WanDiTConfig, height: int, width: int, frames: int) -> int:
    """Tokens of a clip: latent frames 1 + (T − 1)/4, latent pixels /8, patches of the DiT."""
    patch_t, patch_h, patch_w = config.patch_size
    return ((1 + (frames - 1) // 4) // patch_t) * (height // 8 // patch_h) * (width // 8 // patch_w)


# --------------------------------------------------------------------------------------------------
# 1. The formulas


def activation_bytes(config: WanDiTConfig, tokens: int, batch: int, layout: Layout, element: int,
                     fused_feed_forward: bool = False) -> dict[str, float]:
    """Peak bytes of tensors a rank allocates during one DiT forward, per phase, for weights of
    `element` bytes (2: bf16, 4: float32) and the float32 residual stream. `fused_feed_forward`:
    the feed-forward's first linear map and its GELU are one kernel (`linear_then_gelu`: float32
    inference on the CPU), so its hidden layer is held once (beside the second linear map's output),
    not before and after the GELU.

    Counted from the code (stages/base/dit.py, stages/parallel.py), in
      u = one float32 (B, S, dim) tensor, c = the same in the weights' dtype,
      w = one (B, S, ffn_dim) tensor in the weights' dtype, t = the embedded text (B, 512, dim),
    with B the batch a rank computes (halved by cfg 2) and S = ⌈L / (ulysses·ring)⌉ its tokens.
    Alive through a block: its input x (u) and the embedded text (t); from the modulated norm on,
    h (u) and, for bf16 weights, its two casts for the projections (2c). Casts (.to, .float) copy
    only for bf16 weights. Without TeaCache, as here: with it, the cache keeps the first block's
    input through the blocks, one u more in every phase inside them."""
    batch = batch // layout.cfg
    shard = math.ceil(tokens / layout.sequence)
    u, c = batch * shard * config.dim * 4, batch * shard * config.dim * element
    w, t = batch * shard * config.ffn_dim * element, batch * TEXT_TOKENS * config.dim * element
    text_float = batch * TEXT_TOKENS * config.dim * 4
    cast = element != 4

    def norm(projection: float, float32: float) -> float:  # RMSNorm: projection, its float32 copy, 2 temporaries
        return projection + float32 * cast + 2 * float32

    patches = batch * tokens * config.in_dim * math.prod(config.patch_size) * 4
    self_base = u + t + u + 2 * c * cast  # x in, text; h and its two casts
    cross_base = u + t + u + u + u + c * cast  # x in, text, h, new x, norm3(x) and its cast
    phases = {
        "patch embedding": patches + c + u * cast,  # every rank's patches; its tokens' embedding
        "text embedding": u + batch * TEXT_TOKENS * config.text_dim * element * cast + 2 * t,  # the cast, both layers
        "self-attention projections": self_base + max(
            c + norm(c, u),  # normalising k while q is held
            4 * c + u * cast + u + c * cast,  # rotating k: q, k, v, rotated q; float copy, product, cast
        ),
        "self-attention": self_base + 3 * c + 2 * c,  # q, k, v; the output and its copy for the projection
        "cross-attention": cross_base + max(
            norm(c, u),  # normalising q
            c + norm(t, text_float),  # normalising k while q is held
            c + 2 * t + 2 * c,  # q, k, v; the output and its copy
        ),
        # x in, text, x, h, its cast; the hidden layer before and after the GELU, or where they are
        # one kernel, the hidden layer and the second linear map's output
        "feed-forward": u + t + u + u + c * cast + (w + c if fused_feed_forward else 2 * w),
    }
    if layout.ulysses > 1:
        # q, k, v held; the last all-to-all: the two done, its send and receive buffers (the copy
        # into the head layout replaces the send buffer). Attention and the way back hold no more.
        phases["Ulysses all-to-all"] = self_base + 3 * c + 2 * c + 2 * c
    if layout.ring > 1:
        block = shard * layout.ulysses  # tokens of one ring block (a Ulysses group's)
        heads = config.num_heads // layout.ulysses
        rows = min(block, max(1, ATTENTION_CHUNK_BYTES // (4 * batch * heads * block)))
        scores = batch * heads * rows * block * 4
        held = 3 * c * (1 + (layout.ulysses > 1))  # q, k, v (and their head layout after Ulysses)
        # the (k, v) block arriving (2c), the running output (u), float32 q, k, v of a block (3u),
        # the scores and the log-sum-exp's temporary of the same size
        phases["ring attention"] = self_base + held + 2 * c + u + 3 * u + 2 * scores
    return phases


def communication_bytes(config: WanDiTConfig, tokens: int, batch: int, layout: Layout, element: int) -> dict[str, float]:
    """Bytes one rank receives, per collective, in one DiT forward."""
    batch = batch // layout.cfg
    shard = math.ceil(tokens / layout.sequence)
    c = batch * shard * config.dim * element
    result = {}
    if layout.ulysses > 1:
        result["each all-to-all"] = c * (layout.ulysses - 1) / layout.ulysses
        result["all-to-alls per block"] = 4  # q, k, v forward, the output back
    if layout.ring > 1:
        result["each ring step"] = 2 * c  # a (k, v) block of U·S tokens of H/U heads
        result["ring steps per block"] = layout.ring - 1
    per_block = result.get("each all-to-all", 0) * 4 + result.get("each ring step", 0) * (layout.ring - 1)
    out = batch * shard * config.out_dim * math.prod(config.patch_size) * 4  # the head's float32 output
    gather = out * (layout.sequence - 1) + batch * tokens * config.out_dim * math.prod(config.patch_size) * 4 * (layout.cfg - 1)
    result["per forward"] = per_block * config.num_layers + gather
    return result


# --------------------------------------------------------------------------------------------------
# 2. The measurement


class ProfiledRank(GroupMember):
    """One rank: a random DiT of a reduced size (every parameter random, the same on every rank),
    its forward profiled or returned on request."""

    def __init__(self, config: WanDiTConfig, element: int, rank: int = 0, world_size: int = 1):
        torch.set_num_threads(1)
        self.config, self.element = config, element
        self.rank, self.world_size, self.device = rank, world_size, "cpu"

    def start(self, address, peers) -> None:
        from stages.base.dit import WanDiT

        if address is not None:
            self.join_group(*address)
        self.model = WanDiT(self.config).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # Wan's initialisation zeroes the head: make every output depend on every block
            for parameter in self.model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter[0].numel() ** -0.5)
        self.model.to(torch.bfloat16 if self.element == 2 else torch.float32)

    def forward_function(self, layout: Layout, latent_shape: tuple[int, ...], batch: int):
        """A no-argument function running the forward of `batch` copies of one latent, split as
        `layout` says (whole on a group of one rank)."""
        from stages.parallel import make_dit_parallel

        parallel = make_dit_parallel(layout.ulysses, layout.ring, layout.cfg) if self.world_size > 1 else None
        generator = torch.Generator().manual_seed(1)
        latents = torch.randn(1, *latent_shape, generator=generator).repeat(batch, 1, 1, 1, 1)
        text = torch.randn(batch, self.config.text_len, self.config.text_dim, generator=generator)
        timestep = torch.full((batch,), 700.0)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                if parallel is None:
                    return self.model(latents, timestep, text)
                return parallel.forward(self.model, latents, timestep, text)

        return forward

    def velocity(self, layout: Layout, latent_shape: tuple[int, ...]):
        """The velocity of a guidance pair (batch 2), as numpy."""
        return self.forward_function(layout, latent_shape, 2)().float().numpy()

    def measure(self, layout: Layout, latent_shape: tuple[int, ...], batch: int) -> dict:
        """Peak live tensor bytes of FORWARDS profiled forwards, and the bytes this rank received
        in each collective call."""
        import torch.distributed as dist
        from torch.profiler import ProfilerActivity, profile

        forward = self.forward_function(layout, latent_shape, batch)
        forward()  # warm-up: the rotary table and thread pools are made once
        received: dict[str, list[int]] = {}

        def counting(name, function, size_of):
            def wrapper(*args, **kwargs):
                received.setdefault(name, []).append(size_of(*args, **kwargs))
                return function(*args, **kwargs)
            return wrapper

        def a2a_bytes(out, inp, group=None):  # all but the own part of the input
            return inp.numel() * inp.element_size() * (dist.get_world_size(group) - 1) // dist.get_world_size(group)

        originals = {name: getattr(dist, name) for name in ("all_to_all_single", "batch_isend_irecv", "all_gather")}
        peaks = []
        try:
            dist.all_to_all_single = counting("all-to-all", originals["all_to_all_single"], a2a_bytes)
            dist.batch_isend_irecv = counting("ring step", originals["batch_isend_irecv"], lambda ops: sum(
                op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.irecv))
            dist.all_gather = counting("all-gather", originals["all_gather"], lambda pieces, tensor, group=None: (
                tensor.numel() * tensor.element_size() * (len(pieces) - 1)))
            for _ in range(FORWARDS):
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                    forward()
                live = peak = 0
                for event in sorted(profiler.profiler.kineto_results.events(), key=lambda event: event.start_ns()):
                    if event.name() == "[memory]":  # an allocation (+) or a free (−) of the CPU allocator
                        live += event.nbytes()
                        peak = max(peak, live)
                peaks.append(peak)
        finally:
            for name, function in originals.items():
                setattr(dist, name, function)
        return {"peaks": peaks, "received": received}


def on_ranks(config: WanDiTConfig, element: int, layouts: list[Layout], method: str, *args) -> dict:
    """{layout: rank 0's result of `method(layout, *args)`}, each layout on its own group of real ranks."""
    import ray

    from bench_parallel import ProfiledRank as rank_class  # by module name, so Ray's workers import it
    from cascade.config import FrameParallelConfig, Resources
    from cascade.groups import join_groups, start_group, stop_group

    results = {}
    for layout in layouts:
        group = start_group(rank_class, Resources(num_cpus=1), FrameParallelConfig(layout.ranks), config, element)
        try:
            join_groups({"bench": group})
            results[layout] = ray.get([getattr(rank, method).remote(layout, *args) for rank in group.ranks])[0]
        finally:
            stop_group(group)
    return results


# --------------------------------------------------------------------------------------------------
# Tables


FULL_SIZE_LAYOUTS = {  # per model: the split at 1, 2, 4 and 8 ranks (Ulysses must divide the heads)
    "1.3b": [Layout(), Layout(ulysses=2), Layout(ulysses=4), Layout(ulysses=4, ring=2), Layout(ulysses=2, ring=2, cfg=2)],
    "14b": [Layout(), Layout(ulysses=2), Layout(ulysses=4), Layout(ulysses=8), Layout(ulysses=4, cfg=2)],
}
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def computed_table() -> None:
    print("| model | video | tokens | ranks | split | activations per rank (GiB) | peak phase | "
          "each all-to-all (MiB) | each ring step (MiB) | received per forward (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, layouts in FULL_SIZE_LAYOUTS.items():
        config = WAN_DIT_SIZES[size]
        for resolution, (height, width) in RESOLUTIONS.items():
            tokens = video_tokens(config, height, width, 81)
            for layout in layouts:
                phases = activation_bytes(config, tokens, 2, layout, 2)
                phase = max(phases, key=phases.get)
                sent = communication_bytes(config, tokens, 2, layout, 2)
                print(f"| {size} | {resolution} | {tokens} | {layout.ranks} | {layout} | {phases[phase] / GiB:.2f} | "
                      f"{phase} | {sent.get('each all-to-all', 0) / MiB:.0f} | {sent.get('each ring step', 0) / MiB:.0f} | "
                      f"{sent['per forward'] / GiB:.2f} |")


REDUCED = {  # the real head counts and ffn/dim ratios, two blocks, narrower text
    "1.3b-like": replace(WAN_DIT_SIZES["1.3b"], dim=192, ffn_dim=1120, num_layers=2, text_dim=256),
    "14b-like": replace(WAN_DIT_SIZES["14b"], dim=320, ffn_dim=864, num_layers=2, text_dim=256),
}
REDUCED_LATENTS = (16, 5, 24, 40)  # 5 × 12 × 20 = 1200 tokens
REDUCED_LAYOUTS = {
    "1.3b-like": [Layout(), Layout(ulysses=2), Layout(ulysses=4), Layout(ring=2), Layout(ulysses=2, ring=2),
                  Layout(cfg=2), Layout(ulysses=4, ring=2)],
    "14b-like": [Layout(), Layout(ulysses=2), Layout(ulysses=4), Layout(ulysses=8), Layout(ulysses=2, cfg=2)],
}


def measured_table(element: int) -> None:
    def kib(values):
        return "–" if not values else "/".join(sorted({f"{value / 1024:.0f}" for value in values}))

    print("| model | dtype | split | activations, formula (MiB) | measured, 3 forwards (MiB) | measured / formula | "
          "all-to-all, formula (KiB) | measured (KiB) | ring step, formula (KiB) | measured (KiB) | "
          "received per forward, formula (KiB) | measured (KiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, config in REDUCED.items():
        tokens = math.prod(REDUCED_LATENTS[1:]) // 4
        for layout, measured in on_ranks(config, element, REDUCED_LAYOUTS[name], "measure", REDUCED_LATENTS, 2).items():
            # these ranks run on the CPU without autograd, where float32 fuses the feed-forward's first half
            formula = max(activation_bytes(config, tokens, 2, layout, element, fused_feed_forward=element == 4).values())
            sent = communication_bytes(config, tokens, 2, layout, element)
            low, high = min(measured["peaks"]), max(measured["peaks"])
            print(f"| {name} | {'bf16' if element == 2 else 'float32'} | {layout} | {formula / MiB:.2f} | "
                  f"{low / MiB:.2f} – {high / MiB:.2f} | {low / formula:.3f} – {high / formula:.3f} | "
                  f"{sent.get('each all-to-all', 0) / 1024:.0f} | {kib(measured['received'].get('all-to-all'))} | "
                  f"{sent.get('each ring step', 0) / 1024:.0f} | {kib(measured['received'].get('ring step'))} | "
                  f"{sent['per forward'] / 1024:.0f} | {sum(map(sum, measured['received'].values())) / FORWARDS / 1024:.0f} |")


EQUIVALENCE_MODEL = replace(WAN_DIT_SIZES["tiny"], dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=16, text_len=8)
EQUIVALENCE_GRIDS = {"divides": (16, 2, 8, 8), "pads": (16, 3, 6, 6)}  # latents: 32 and 27 tokens
EQUIVALENCE_LAYOUTS = [Layout(ulysses=2), Layout(ulysses=4), Layout(ring=2), Layout(ulysses=2, ring=2),
                       Layout(cfg=2), Layout(ulysses=2, cfg=2)]


def equivalence_table() -> None:
    import numpy as np

    print("| split | ranks | tokens | max relative error against one process |")
    print("|---|---|---|---|")
    for name, latent_shape in EQUIVALENCE_GRIDS.items():
        [reference] = on_ranks(EQUIVALENCE_MODEL, 4, [Layout()], "velocity", latent_shape).values()
        for layout, velocity in on_ranks(EQUIVALENCE_MODEL, 4, EQUIVALENCE_LAYOUTS, "velocity", latent_shape).items():
            error = np.abs(velocity - reference).max() / np.abs(reference).max()
            tokens = math.prod(latent_shape[1:]) // 4
            print(f"| {layout} | {layout.ranks} | {tokens} ({name}) | {error:.1e} |")


def run_stage(name: str, overrides: list[str], clip, request):
    """One stage of the tiny cascade on its group of ranks (`overrides` say how many): its clip."""
    import ray

    from cascade.actors import StageWorker
    from cascade.config import load_config
    from cascade.groups import join_groups, start_group, stop_group

    config = load_config(None, overrides)
    section = getattr(config.stages, name)
    group = start_group(StageWorker, section.resources, section.parallel, name, section, config.output)
    try:
        join_groups({name: group})
        return ray.get(group.leader.run.remote(clip, request)[0])
    finally:
        stop_group(group)


def stages_table() -> None:
    """Each stage of the tiny cascade (default config) split over ranks against one rank."""
    import numpy as np

    from cascade.config import load_config
    from run_cascade import make_requests

    [request] = make_requests(["一个红色的球向右滚动"], load_config(), seed=5)
    latents = run_stage("base", [], None, request)
    frames = run_stage("tsr", [], latents, request)
    upsampled = run_stage("ssr", [], frames, request)
    print("| stage | split | difference from one rank |")
    print("|---|---|---|")
    for overrides in (["stages.base.parallel.ulysses=2"], ["stages.base.parallel.ring=2"],
                      ["stages.base.parallel.cfg=2"], ["stages.base.parallel.ulysses=2", "stages.base.parallel.cfg=2"]):
        split = run_stage("base", overrides, None, request).data
        error = np.abs(split - latents.data).max() / np.abs(latents.data).max()
        print(f"| base (20 steps) | {' '.join(overrides)} | latents: max relative {error:.1e} |")
    for ranks in (2, 4):
        split = run_stage("tsr", [f"stages.tsr.parallel.frames={ranks}"], latents, request).data
        print(f"| tsr | {ranks} ranks | frames: max {np.abs(split.astype(int) - frames.data).max()} levels |")
    for warmup in (0, 1, 2, 4, 8):
        split = run_stage("ssr", ["stages.ssr.parallel.frames=2", f"stages.ssr.parallel.warmup_frames={warmup}"],
                          frames, request).data
        difference = np.abs(split.astype(int) - upsampled.data)
        print(f"| ssr | 2 ranks, warm-up {warmup} | frames: max {difference.max()} levels, "
              f"{(difference > 0).mean():.1e} of values differ |")
    # the whole split cascade: its ssr output against the one-rank cascade's
    split_overrides = ["stages.base.parallel.ulysses=2", "stages.base.parallel.cfg=2"]
    split_latents = run_stage("base", split_overrides, None, request)
    split_frames = run_stage("tsr", ["stages.tsr.parallel.frames=2"], split_latents, request)
    split_final = run_stage("ssr", ["stages.ssr.parallel.frames=2"], split_frames, request).data
    difference = np.abs(split_final.astype(int) - upsampled.data)
    print(f"| cascade | base U 2 × C 2, tsr 2, ssr 2 | final frames: max {difference.max()} levels, "
          f"{(difference > 0).mean():.1e} of values differ, mean {difference.mean():.1e} |")


def cascade_table(runs: int) -> None:
    """The tiny cascade (default config) with the base stage on 1 and 2 ranks: stage times."""
    from cascade.config import load_config
    from cascade.graph import create_pools, load_pools, run_pipelined, stop_pools
    from run_cascade import make_requests

    print("| base stage | base wall (s, median) | tsr | ssr | one prompt through the cascade (s, median) |")
    print("|---|---|---|---|---|")
    for label, overrides in (("1 rank", []), ("2 ranks, Ulysses 2", ["stages.base.parallel.ulysses=2"]),
                             ("2 ranks, CFG 2", ["stages.base.parallel.cfg=2"])):
        config = load_config(None, overrides)
        pools = create_pools(config)
        try:
            load_pools(pools)
            requests = make_requests(["一个红色的球向右滚动"], config, seed=5)
            run_pipelined(pools, requests, 1, lambda request, report, output: None, lambda result: None)  # warm-up
            walls, stages = [], {"base": [], "tsr": [], "ssr": []}
            for _ in range(runs):
                started = time.perf_counter()
                run_pipelined(pools, requests, 1, lambda request, report, output: stages[report.stage].append(report.wall_time_s),
                              lambda result: None)
                walls.append(time.perf_counter() - started)
        finally:
            stop_pools(pools)
        median = {stage: statistics.median(times) for stage, times in stages.items()}
        print(f"| {label} | {median['base']:.2f} | {median['tsr']:.2f} | {median['ssr']:.2f} | {statistics.median(walls):.2f} |")


TABLES = ("computed", "measured", "equivalence", "stages", "cascade")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, of {', '.join(TABLES)}")
    parser.add_argument("--runs", type=int, default=3, help="cascade runs per setting")
    args = parser.parse_args()
    tables = args.tables.split(",")
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        parser.error(f"unknown table(s) {', '.join(unknown)}: choose from {', '.join(TABLES)}")
    if "computed" in tables:
        print("## Computed: Wan2.1, bf16, 81 frames, guidance batch 2, per rank\n")
        computed_table()
    if set(tables) - {"computed"}:
        import ray

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        if "measured" in tables:
            for element in (2, 4):
                print(f"\n## Measured at a reduced size on the CPU ({'bf16' if element == 2 else 'float32'})\n")
                measured_table(element)
        if "equivalence" in tables:
            print("\n## The DiT forward split over ranks against one process (float32)\n")
            equivalence_table()
        if "stages" in tables:
            print("\n## The tiny cascade's stages split over ranks against one rank\n")
            stages_table()
        if "cascade" in tables:
            print("\n## The tiny cascade on the CPU (2 cores)\n")
            cascade_table(args.runs)
    finally:
        if set(tables) - {"computed"}:
            ray.shutdown()


if __name__ == "__main__":
    main()
