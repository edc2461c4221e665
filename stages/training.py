"""The one training loop every stage model uses: AdamW with cosine decay, optionally an exponential
moving average of the weights and torch.compile, a progress bar with the losses, a JSON-lines log,
and checkpoints that resume exactly.

A run lives in one folder:

    OUT/checkpoint.pt         model, optimizer, step and RNG states (written atomically)
    OUT/train_log.jsonl       {"step", "loss", <loss parts>, "seconds"} every `log_every` steps
    OUT/<weights_name>        the final weights (safetensors), what the stages load

Running the same command again after an interruption continues from the last checkpoint; since
`batches(step)` is a function of the step, the resumed run sees the same data it would have seen.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from stages.compiling import require_compiler
from stages.weights import write_safetensors

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"


@dataclass
class TrainingConfig:
    steps: int = 2000
    batch_size: int = 8
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    threads: int = 1
    # above 0, the written weights are the exponential moving average of the weights after each
    # step, w ← decay·w + (1 − decay)·weights (about the last 1/(1 − decay) steps)
    average_decay: float = 0.0
    # torch.compile the model for the loss (forward and backward); on a CPU it needs a C++ compiler
    # (train() refuses at once without one: stages/compiling.py)
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainingConfig.{name}={getattr(self, name)!r} must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainingConfig.learning_rate={self.learning_rate!r} must be positive")
        if not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"TrainingConfig.average_decay={self.average_decay!r} must be in [0, 1) (0: no average)")


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, config: TrainingConfig,
                    average: AveragedModel | None = None) -> None:
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "rng": _rng_state(), "config": asdict(config),
         **({"average": average.state_dict()} if average is not None else {})},
        buffer,
    )
    _write_atomic(path, buffer.getvalue())


def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
    batches: Callable[[int], Any],
    config: TrainingConfig,
    out_dir: Path,
    weights_name: str,
) -> Path:
    """Trains `model` for `config.steps` steps (continuing a checkpoint in `out_dir` if there is
    one) and returns the path of the final safetensors weights (the average with
    `config.average_decay`; `model` itself holds the last weights)."""
    if config.compile:
        require_compiler(next(model.parameters()).device, "training.compile")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    average = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.average_decay), use_buffers=True)
               if config.average_decay else None)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    start = 0
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if average is not None and "average" in state:
            average.load_state_dict(state["average"])
        elif average is not None:
            log.info("%s holds no average of the weights: the average starts at step %d", checkpoint_path, state["step"])
        start = state["step"]
        _set_rng_state(state["rng"])
        log.info("resuming %s from step %d", out_dir, start)
    else:
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
    scheduler.last_epoch = start - 1
    with warnings.catch_warnings():  # no optimizer step yet: this only sets the first learning rate
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()

    model.train()
    loss_model = torch.compile(model) if config.compile else model
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"training {weights_name}")
    for step in bar:
        loss, parts = loss_fn(loss_model, batches(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(model)  # the first call copies the weights
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            record = {"step": done, "loss": loss.item(), **parts, "seconds": round(time.perf_counter() - started, 2)}
            with open(out_dir / LOG_NAME, "a") as file:
                file.write(json.dumps(record) + "\n")
            bar.set_postfix({key: f"{value:.4g}" for key, value in record.items() if key not in ("step", "seconds")})
        if done % config.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(checkpoint_path, model, optimizer, done, config, average)
    model.eval()
    weights_path = out_dir / weights_name
    write_safetensors(weights_path, (average.module if average is not None else model).state_dict())
    log.info("wrote %s", weights_path)
    return weights_path


def config_from_overrides(schema: type, overrides: list[str], settings: dict[str, Any] | None = None) -> Any:
    """An instance of the structured-config dataclass `schema` with `key=value` overrides applied,
    then the dotted `settings` that are not None (command-line options such as --steps). Raises
    ValueError naming the bad key or value."""
    merged = OmegaConf.structured(schema)
    try:
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value (e.g. training.batch_size=4)")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        for key, value in (settings or {}).items():
            if value is not None:
                OmegaConf.update(merged, key, value, merge=False)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ValueError(str(error).splitlines()[0]) from None


RECORD_NAME = "training_record.json"  # what a run was: command, config, data, time, final losses


def write_record(
    out_dir: Path, stage: str, argv: list[str], data: str, config: Any, model: nn.Module, started: float,
    weights: Path, init: str = "", **extra: Any,
) -> dict[str, Any]:
    """Writes what a run was as `OUT/training_record.json`, atomically, and returns it: the command
    (`train_stage.py` `stage` and its `argv`), its data, its config (a dataclass), the weights it
    started from (`init`, "" when from scratch), the model's parameter count, the wall time since
    `started` (time.time()), the final losses of its log, any `extra` entries and the weights it
    wrote."""
    record = {
        "command": " ".join([f"python train_stage.py {stage}", *argv]),
        "data": data,
        "config": asdict(config),
        "init": init,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "wall_seconds_of_this_invocation": round(time.time() - started, 1),
        "final_losses": final_losses(out_dir),
        **extra,
        "weights": str(weights),
    }
    _write_atomic(Path(out_dir) / RECORD_NAME, (json.dumps(record, indent=2) + "\n").encode())
    return record


def final_losses(out_dir: Path, last: int = 5) -> dict[str, float]:
    """The mean of the last `last` logged values of each loss of a run."""
    records = [json.loads(line) for line in (Path(out_dir) / LOG_NAME).read_text().splitlines() if line.strip()]
    records = records[-last:]
    keys = [key for key in records[-1] if key not in ("step", "seconds")]
    return {key: round(float(np.mean([record[key] for record in records])), 5) for key in keys}
