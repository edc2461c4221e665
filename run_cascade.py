r"""Text prompt(s) in, full-resolution high-frame-rate video out.

    python run_cascade.py --prompt "一个红色的球向右滚动"
    python run_cascade.py --config configs/wan2.1-t2v-1.3b.yaml checkpoint=/models/Wan2.1-T2V-1.3B \
        --prompt "a red ball rolling across the grass" stages.base.steps=30 --seed 7
    python run_cascade.py --prompts-file prompts.txt --address head-node:6379

Options and key=value config overrides mix in any order. `run-cascade` (installed by `pip install -e .`)
is the same command from any directory; a relative --config path that does not exist there is taken
from the project (configs/...).

Reads the config (tiny by default), checks every input before anything starts, starts or joins Ray,
checks that the machine (or the cluster) can hold every stage, puts each stage on its own actors,
loads the models, then runs the prompts through the stages, writing each prompt's previews as its
stages finish and its video and manifest when it is done. Bad input, and stages asking for more
than a Ray started here can offer, exit with code 2 and a one-line message; a prompt that fails
while running exits with code 1 after the other prompts are written. On a cluster that cannot place
the stages yet, the run waits (an autoscaler may add nodes) and says what it waits for. A stage
process that dies is restarted and its call run again; Ctrl-C or SIGTERM stops the run within
seconds (exit code 130 or 143), each begun prompt's manifest saying where it got to, and the same
command with --resume finishes it.
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

from cascade.progress import StatusLineHandler

DEFAULT_PROMPT = "一个红色的球向右滚动"  # "a red ball rolls to the right"

log = logging.getLogger("run_cascade")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    summary, examples, mixing = __doc__.split("\n\n")[:3]
    parser = argparse.ArgumentParser(description=summary, epilog=f"examples:\n{examples}\n\n{mixing}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"the text to turn into a video (default: {DEFAULT_PROMPT!r})")
    source.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line, run pipelined")
    parser.add_argument("--config", type=Path, default=None, help="cascade config YAML (default: configs/tiny.yaml)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the results (default: outputs/)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, recorded in the manifest)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (host:port, ray://host:port or auto)")
    parser.add_argument("--resume", action="store_true",
                        help="finish the last run in --out: same prompts and config; written videos are kept")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. stages.base.steps=20")
    return parser.parse_intermixed_args(argv)


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


PROJECT_EXCLUDES = ["outputs", "runs", "docs", "tests", "bench", "*.egg-info", "__pycache__", ".*_cache"]
TOKEN_PLACES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def find_auth_token() -> str | None:
    """Where Ray reads this client's cluster token from, in Ray's order, or None when there is none."""
    from cascade.errors import UserError

    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).expanduser().is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} is not a file: point it at the cluster's token file")
        return f"RAY_AUTH_TOKEN_PATH={path}"
    return "~/.ray/auth_token" if (Path.home() / ".ray" / "auth_token").is_file() else None


def refuses_this_client(address: str) -> bool:
    """Whether the cluster's control service refuses this client's credentials (none, or its
    token), asked directly, which takes milliseconds where a refused `ray.init` waits 20 s."""
    import ray
    from ray._raylet import GcsClient

    try:
        GcsClient(address=address).internal_kv_get(b"cascade-probe", namespace=None, timeout=10)
    except ray.exceptions.AuthenticationError:
        return True
    except Exception:  # anything else is for ray.init to report
        return False
    return False


def join_cluster(address: str) -> None:
    """Connects to a running cluster. A cluster with token authentication (Ray 2.60's default when
    its head has a token) refuses a client that sends no token, and Ray sends one only to a cluster
    found by `auto`: so a host:port cluster is asked first, and if it wants a token, the one found
    where Ray looks for it is sent (a cluster without authentication must not get one: it cannot
    call back a client in token mode)."""
    import ray

    from cascade.errors import UserError

    check_address(address)
    fix = "copy the head node's ~/.ray/auth_token here or set RAY_AUTH_TOKEN to its content"
    explicit = address != "auto" and not address.startswith("ray://") and "RAY_AUTH_MODE" not in os.environ
    if explicit and refuses_this_client(address):
        token = find_auth_token()
        if token is None:
            raise UserError(f"cannot join the Ray cluster at {address}: it uses token authentication and no token "
                            f"was found in {TOKEN_PLACES}: {fix}")
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")  # Ray reads its settings at import: read the mode again
        if refuses_this_client(address):
            raise UserError(f"cannot join the Ray cluster at {address}: it refused the token from {token}, "
                            f"which is not the cluster's token: {fix}")
    # The project's code, configs and shipped weights go to every node (weights/... resolve from there).
    project = {"working_dir": str(Path(__file__).resolve().parent), "excludes": PROJECT_EXCLUDES}
    try:
        ray.init(address=address, runtime_env=project, log_to_driver=True)
    except (ConnectionError, ray.exceptions.AuthenticationError) as error:
        raise UserError(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    log.info("joined the Ray cluster at %s", address)


def start_ray(address: str | None, config) -> None:
    import ray

    if address is not None:
        join_cluster(address)
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


def make_requests(prompts: list[str], config, seed: int) -> list:
    from cascade.payload import Request

    video = config.video
    return [
        Request(
            prompt=prompt,
            negative_prompt=config.stages.base.negative_prompt,
            seed=seed + index,
            height=video.height,
            width=video.width,
            num_frames=video.num_frames,
            fps=video.fps,
            index=index,
        )
        for index, prompt in enumerate(prompts)
    ]


def run(args: argparse.Namespace, status: StatusLineHandler) -> int:
    import ray

    from cascade.config import load_config, to_plain_dict
    from cascade.errors import UserError
    from cascade.graph import StageLost, create_pools, load_pools, run_pipelined, stop_pools
    from cascade.groups import check_machine, check_placement
    from cascade.outputs import (
        IndexWriter,
        RunWriter,
        check_writable,
        read_run_record,
        software_versions,
        write_run_record,
    )
    from cascade.progress import ProgressBoard, status_line
    from cascade.signals import Interrupted, stop_on_signals

    prompts = read_prompts(args)
    config = load_config(args.config, args.overrides)
    check_writable(args.out)
    plain_config = to_plain_dict(config)
    record = read_run_record(args.out, prompts, plain_config, args.seed) if args.resume else None
    seed = record["seed"] if record else args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    requests = make_requests(prompts, config, seed)

    start_ray(args.address, config)
    restore_signal_handlers = stop_on_signals()  # after Ray's start, which sets its own SIGTERM handler
    pools, writers, results, unwritten = {}, {}, [], set()
    update_index = lambda: None  # noqa: E731 (a prompts-file run replaces it)
    try:
        if args.address is None:
            check_machine(config)  # a Ray started here gains no resources while it waits
            check_placement(config)
        else:
            try:
                check_placement(config)
            except UserError as problem:  # an autoscaler may still add the nodes it needs
                log.warning("WARNING the cluster cannot place every stage with its nodes now: %s. Waiting for "
                            "nodes to join; stop it with Ctrl-C", problem)
        board = None
        if status.on_terminal:  # a status line of every running stage call under the log lines
            board = ray.remote(ProgressBoard).options(name="cascade-progress", num_cpus=0).remote()
        pools = create_pools(config, progress_board=board)
        loaded = load_pools(pools)
        warnings = [f"{stage}: {warning}" for stage, leaders in loaded.items() for warning in leaders[0]["warnings"]]
        for warning in warnings:
            log.warning("WARNING %s", warning)
        manifest_base = {
            "config": plain_config,
            "warnings": warnings,
            "devices": {stage: [leader["device"] for leader in leaders] for stage, leaders in loaded.items()},
            "software": software_versions(),
        }
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for request in requests:
            if record:
                writers[request.index] = RunWriter(args.out, record["folders"][str(request.index)], request,
                                                   manifest_base, resume=True)
            else:
                suffix = f"-p{request.index:03d}" if len(requests) > 1 else ""
                writers[request.index] = RunWriter(args.out, f"{stamp}-s{request.seed}{suffix}", request, manifest_base)
        write_run_record(args.out, prompts, seed, plain_config,
                         {index: writer.folder.name for index, writer in writers.items()})
        if len(requests) > 1:
            update_index = IndexWriter(args.out, list(writers.values())).update
        update_index()
        to_run, starts = plan_resume(requests, writers) if record else (requests, {})
        keep = {"base", *(["tsr"] if config.output.keep_tsr_frames else [])}

        def on_report(request, report, output) -> None:
            writer = writers[request.index]
            try:
                writer.add_report(report)
                if report.stage in keep and pools[report.stage].direct is None:  # a direct hop's output stays on its GPU
                    writer.keep_stage_output(report.stage, ray.get(output))
            except OSError as error:
                log.error("prompt %d: cannot write its %s output in %s: %s", request.index, report.stage,
                          writer.folder, error.strerror or error)
            update_index()
            log.info("prompt %d: %s done in %.1f s on %s (replica %d)", request.index, report.stage, report.wall_time_s,
                     report.device, report.replica)

        def on_done(result) -> None:
            index = result.request.index
            try:
                folder = writers[index].finish(result.video, result.error, result.failed_stage)
            except OSError as error:  # a full disk: this prompt fails, no partial file is left, the rest go on
                unwritten.add(index)
                log.error("prompt %d failed: cannot write its video in %s: %s", index, writers[index].folder,
                          error.strerror or error)
                return
            update_index()
            if result.error is None:
                log.info("prompt %d: wrote %s", index, folder / "video.mp4")
            else:
                cause = getattr(result.error, "cause", None) or result.error
                log.error("prompt %d failed in %s: %s (manifest: %s)", index, result.failed_stage,
                          str(cause).strip().splitlines()[-1], folder / "manifest.json")

        def on_idle() -> None:
            if board is not None:
                status.show(status_line(ray.get(board.take.remote())))

        results = run_pipelined(pools, to_run, config.output.max_prompts_in_flight, on_report, on_done, on_idle, starts,
                                config.patience_s, config.retries)
        status.show("")
    except (Interrupted, StageLost) as stop:
        status.show("")
        stopped = [writer.interrupt() for writer in writers.values() if writer.manifest["status"] == "running"]
        update_index()
        cause = f"interrupted by {stop}" if isinstance(stop, Interrupted) else f"stopped: {stop}"
        log.error("%s: %d prompt(s) stopped before their video (%d begun, their manifests say where they got to); "
                  "run the same command with --resume to finish them", cause, len(stopped),
                  sum(folder is not None for folder in stopped))
        return 128 + stop.signum if isinstance(stop, Interrupted) else 1
    finally:
        restore_signal_handlers()
        if args.address is None:
            ray.shutdown()
        elif ray.is_initialized():
            stop_pools(pools)  # free the cluster's resources now, not when the job ends
    failed = unwritten | {result.request.index for result in results if result.error is not None}
    return 1 if failed else 0


def plan_resume(requests: list, writers: dict) -> tuple[list, dict]:
    """Which prompts an earlier run left to do, and the stage each starts at: after the last stage
    whose output it kept (that output put in the object store as its input), or at the first stage."""
    import ray

    from cascade.actors import STAGE_NAMES

    to_run, starts = [], {}
    for request in requests:
        writer = writers[request.index]
        if writer.written:
            log.info("prompt %d: already written in %s, skipped", request.index, writer.folder)
            continue
        kept_stage, kept_clip = writer.last_kept_output(STAGE_NAMES[:-1]) or (None, None)
        start = writer.resume(STAGE_NAMES, kept_stage)
        if kept_stage:
            starts[request.index] = (STAGE_NAMES.index(start), ray.put(kept_clip))
            log.info("prompt %d: resumes at %s from the %s output kept in %s", request.index, start, kept_stage,
                     writer.folder)
        to_run.append(request)
    return to_run, starts


def main(argv: list[str] | None = None) -> int:
    status = StatusLineHandler(sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[status])
    args = parse_args(argv)
    from cascade.errors import UserError
    from stages.compiling import CompilerMissing
    from stages.weights import WeightsError

    try:
        return run(args, status)
    except (UserError, WeightsError, CompilerMissing) as error:
        cause = getattr(error, "cause", None) or error  # errors raised inside a Ray actor carry their cause
        print(f"error: {str(cause).strip().splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
