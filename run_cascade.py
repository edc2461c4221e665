"""Text prompt(s) in, full-resolution high-frame-rate video out.

    python run_cascade.py --prompt "一个红色的球向右滚动"
    python run_cascade.py --config configs/wan2.1-t2v-1.3b.yaml checkpoint=/models/Wan2.1-T2V-1.3B \
        --prompt "a red ball rolling across the grass" stages.base.steps=30
    python run_cascade.py --prompts-file prompts.txt --address head-node:6379

Reads the config (tiny by default), checks every input before anything starts, starts or joins Ray,
puts each stage on its own actor, loads the models, then runs the prompts through the DAG, writing
each prompt's previews as its stages finish and its video and manifest when it is done. Bad input
exits with code 2 and a one-line message; a prompt that fails while running exits with code 1 after
the other prompts are written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "一个红色的球向右滚动"  # "a red ball rolls to the right"

log = logging.getLogger("run_cascade")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"the text to turn into a video (default: {DEFAULT_PROMPT!r})")
    source.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line, run pipelined")
    parser.add_argument("--config", type=Path, default=None, help="cascade config YAML (default: configs/tiny.yaml)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the results (default: outputs/)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, recorded in the manifest)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (host:port, ray://host:port or auto)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stages.base.steps=20")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    from cascade.errors import UserError

    if args.prompts_file is None:
        prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
        if not prompt.strip():
            raise UserError("the prompt is empty: give --prompt some text describing the video")
        return [prompt.strip()]
    try:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"cannot read prompts file {args.prompts_file}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UserError(f"prompts file {args.prompts_file} is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {args.prompts_file} holds no prompts (one per line expected)")
    return prompts


def check_address(address: str) -> None:
    """Fails fast, with a clear message, when a host:port cluster address does not answer."""
    from cascade.errors import UserError

    if address == "auto":
        return
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def start_ray(address: str | None, config) -> None:
    import ray

    from cascade.errors import UserError

    if address is not None:
        check_address(address)
        root = Path(__file__).resolve().parent
        modules = [str(root / name) for name in ("cascade", "stages", "flows")]
        try:
            ray.init(address=address, runtime_env={"py_modules": modules}, log_to_driver=True)
        except ConnectionError as error:
            raise UserError(f"cannot join the Ray cluster at {address}: {error}") from None
        log.info("joined the Ray cluster at %s", address)
        return
    from cascade.groups import requested_resources

    # A local Ray offers at least the CPU slots the stages' ranks ask for, even on a 2-core laptop.
    asked = requested_resources(config).get("CPU", 0.0)
    context = ray.init(
        address="local",  # a new local Ray, even if another one runs on this machine
        num_cpus=max(os.cpu_count() or 1, math.ceil(asked)),
        include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
    )
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def make_requests(prompts: list[str], config, seed: int | None) -> list:
    from cascade.payload import Request

    base_seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    video = config.video
    return [
        Request(
            prompt=prompt,
            negative_prompt=config.stages.base.negative_prompt,
            seed=base_seed + index,
            height=video.height,
            width=video.width,
            num_frames=video.num_frames,
            fps=video.fps,
            index=index,
        )
        for index, prompt in enumerate(prompts)
    ]


def run(args: argparse.Namespace) -> int:
    import ray

    from cascade.config import load_config, to_plain_dict
    from cascade.graph import create_pools, load_pools, run_pipelined, stop_pools
    from cascade.groups import check_placement
    from cascade.outputs import RunWriter, check_writable, software_versions

    prompts = read_prompts(args)
    config = load_config(args.config, args.overrides)
    check_writable(args.out)
    requests = make_requests(prompts, config, args.seed)

    start_ray(args.address, config)
    pools = {}
    try:
        check_placement(config)
        pools = create_pools(config)
        loaded = load_pools(pools)
        warnings = [f"{stage}: {warning}" for stage, leaders in loaded.items() for warning in leaders[0]["warnings"]]
        for warning in warnings:
            log.warning("WARNING %s", warning)
        manifest_base = {
            "config": to_plain_dict(config),
            "warnings": warnings,
            "devices": {stage: [leader["device"] for leader in leaders] for stage, leaders in loaded.items()},
            "software": software_versions(),
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        writers = {}
        for request in requests:
            suffix = f"-p{request.index:03d}" if len(requests) > 1 else ""
            writers[request.index] = RunWriter(args.out, f"{stamp}-s{request.seed}{suffix}", request, manifest_base)

        def on_report(request, report) -> None:
            writers[request.index].add_report(report)
            log.info("prompt %d: %s done in %.1f s on %s (replica %d)", request.index, report.stage, report.wall_time_s,
                     report.device, report.replica)

        def on_done(result) -> None:
            folder = writers[result.request.index].finish(result.video, result.error, result.failed_stage)
            if result.error is None:
                log.info("prompt %d: wrote %s", result.request.index, folder / "video.mp4")
            else:
                cause = getattr(result.error, "cause", None) or result.error
                log.error("prompt %d failed in %s: %s (manifest: %s)", result.request.index, result.failed_stage,
                          str(cause).strip().splitlines()[-1], folder / "manifest.json")

        results = run_pipelined(pools, requests, config.output.max_prompts_in_flight, on_report, on_done)
    finally:
        if args.address is None:
            ray.shutdown()
        elif ray.is_initialized():
            stop_pools(pools)  # free the cluster's resources now, not when the job ends
    return 0 if all(result.error is None for result in results) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from cascade.errors import UserError
    from stages.weights import WeightsError

    try:
        return run(args)
    except (UserError, WeightsError) as error:
        cause = getattr(error, "cause", None) or error  # errors raised inside a Ray actor carry their cause
        print(f"error: {str(cause).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
