"""CPU benchmark: our WanDiT forward against diffusers' WanTransformer3DModel, same weights, same input.

    python bench/bench_dit.py [--threads N] [--runs N]    # from the repository root

Time: both models live in this process; after one warm-up forward each, their forwards alternate
(so load from other processes on the machine falls on both alike). Each forward's wall time and
process CPU time are recorded; the table gives medians, and as ratios the median over rounds of
ours / diffusers within a round (forwards that ran under the same load). On a shared machine the
CPU time with --threads 1 is the steady number: it leaves out time spent waiting for a core.

Peak memory: each model runs in its own fresh subprocess. After building the model and the inputs and
one warm-up forward, the subprocess resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs), runs one forward, and reports VmHWM − VmRSS-before: the most memory the
forward added over weights and inputs. glibc's mmap threshold is fixed at 64 KiB in the subprocess
(MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the kernel at once and RSS follows the live
tensors instead of what malloc keeps cached from the warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

from stages.base.dit import WanDiT, WanDiTConfig, official_state_dict_from_diffusers  # noqa: E402
from stages.weights import load_into  # noqa: E402

CONFIG = WanDiTConfig(dim=512, ffn_dim=1536, num_heads=8, num_layers=4, text_len=512, text_dim=4096)
LATENT_SHAPE = (1, 16, 5, 30, 52)  # 5 × 15 × 26 = 1950 tokens


def diffusers_model(config: WanDiTConfig = CONFIG, seed: int = 0) -> WanTransformer3DModel:
    """diffusers' Wan transformer of `config`'s sizes with its own random initialisation."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=tuple(config.patch_size),
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        eps=config.eps,
    ).eval()


def our_model(reference: WanTransformer3DModel, config: WanDiTConfig = CONFIG) -> WanDiT:
    """Our WanDiT holding `reference`'s weights (converted to the official names)."""
    model = WanDiT(config).eval()
    load_into(model, official_state_dict_from_diffusers(reference.state_dict()), source="diffusers model")
    return model


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(LATENT_SHAPE, generator=generator)
    timestep = torch.tensor([700.0])
    text = torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=generator)
    return latents, timestep, text


def forward(name: str, model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if name == "diffusers":
        return model(*args, return_dict=False)[0]
    return model(*args)


def proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def measure_peak_memory_worker(name: str) -> None:
    """Runs in a subprocess: prints the forward's peak memory over weights and inputs, in MiB."""
    reference = diffusers_model()
    model = reference if name == "diffusers" else our_model(reference)
    if name != "diffusers":
        del reference
    args = inputs()
    with torch.inference_mode():
        forward(name, model, args)  # warm-up: one-off allocations (RoPE tables, thread pools)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = proc_status_kib("VmRSS")
        forward(name, model, args)
        peak = proc_status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024}))


def peak_memory_mib(name: str, threads: int) -> float:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, __file__, "--memory-worker", name, "--threads", str(threads)],
        env=environment, capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def forward_times(
    models: dict[str, torch.nn.Module], args: tuple[torch.Tensor, ...], runs: int
) -> dict[str, dict[str, list[float]]]:
    """{clock: {model: seconds of each forward}} for the clocks "wall" and "cpu"."""
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    with torch.inference_mode():
        for name, model in models.items():
            forward(name, model, args)  # warm-up
        for _ in range(runs):
            for name, model in models.items():
                wall, cpu = time.perf_counter(), time.process_time()
                forward(name, model, args)
                times["cpu"].setdefault(name, []).append(time.process_time() - cpu)
                times["wall"].setdefault(name, []).append(time.perf_counter() - wall)
    return times


def paired_ratio(seconds: dict[str, list[float]]) -> float:
    return statistics.median(ours / theirs for ours, theirs in zip(seconds["ours"], seconds["diffusers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--runs", type=int, default=7, help="timed forwards of each model")
    parser.add_argument("--memory-worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.memory_worker:
        measure_peak_memory_worker(options.memory_worker)
        return

    reference = diffusers_model()
    models = {"ours": our_model(reference), "diffusers": reference}
    args = inputs()
    with torch.inference_mode():
        ours, theirs = (forward(name, model, args) for name, model in models.items())
    relative_error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    times = forward_times(models, args, options.runs)
    memory = {name: peak_memory_mib(name, options.threads) for name in models}

    tokens = LATENT_SHAPE[2] * (LATENT_SHAPE[3] // 2) * (LATENT_SHAPE[4] // 2)
    print(
        f"WanDiT vs diffusers WanTransformer3DModel, CPU float32, {torch.get_num_threads()} threads, "
        f"dim {CONFIG.dim}, {CONFIG.num_heads} heads, {CONFIG.num_layers} layers, ffn {CONFIG.ffn_dim}, "
        f"latents {LATENT_SHAPE} ({tokens} tokens), text (1, {CONFIG.text_len}, {CONFIG.text_dim}); "
        f"outputs differ by {relative_error:.1e} (max abs / max abs)\n"
    )
    print(f"| model | wall time, median of {options.runs} (s) | wall fastest – slowest (s) "
          "| CPU time, median (s) | peak memory of a forward (MiB) |")
    print("|---|---|---|---|---|")
    for name in models:
        wall, cpu = times["wall"][name], times["cpu"][name]
        print(f"| {name} | {statistics.median(wall):.3f} | {min(wall):.3f} – {max(wall):.3f} "
              f"| {statistics.median(cpu):.3f} | {memory[name]:.1f} |")
    print(f"| ours / diffusers | {paired_ratio(times['wall']):.3f} | | {paired_ratio(times['cpu']):.3f} "
          f"| {memory['ours'] / memory['diffusers']:.3f} |")


if __name__ == "__main__":
    main()
