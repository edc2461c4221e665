"""The cascade's configuration: omegaconf structured configs merged with a YAML file and
`key=value` overrides.

Each stage's model config lives beside its stage (stages/*/stage.py); this file adds what the
orchestration needs (Ray resources, the video request, outputs) and checks everything that can be
checked before a model loads: unknown keys, wrong types, and values out of range or inconsistent
between stages. Every failure is a `ConfigError` naming the key and what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade.errors import ConfigError
from stages.base.stage import BaseStageConfig
from stages.ssr.stage import SsrStageConfig
from stages.tsr.stage import TsrStageConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

MAX_FACTOR = 8  # temporal super-resolution: k − 1 new frames between each pair, 1 ≤ k ≤ 8
SCALES = (2, 4)  # spatial super-resolution: one wavelet level per ×2
DTYPES = ("float32", "bfloat16", "float16")
PLACEMENTS = ("STRICT_PACK", "PACK", "SPREAD")  # Ray placement group strategies for a stage's ranks
TRANSPORTS = ("auto", "object_store", "direct")  # how clips go from one stage to the next (hop_backend)


@dataclass
class Resources:
    """What a stage's Ray actor asks the cluster for."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    custom: Dict[str, float] = field(default_factory=dict)  # e.g. {"base_node": 1}


@dataclass
class DiTParallelConfig:
    """The base stage's ranks: ulysses·ring·cfg Ray actors, each with the stage's `resources`,
    computing every DiT call together (stages/parallel.py)."""

    ulysses: int = 1  # ranks exchanging attention heads by all-to-all; must divide the DiT's heads
    ring: int = 1  # Ulysses groups passing key/value blocks around a ring
    cfg: int = 1  # 2: the conditional and unconditional branches on two halves of the group
    placement: str = "STRICT_PACK"  # Ray placement strategy: STRICT_PACK keeps the group on one node

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg


@dataclass
class FrameParallelConfig:
    """A stage's ranks splitting its frames into contiguous ranges, one per rank."""

    frames: int = 1
    placement: str = "STRICT_PACK"

    @property
    def world_size(self) -> int:
        return self.frames


@dataclass
class SsrParallelConfig(FrameParallelConfig):
    # The upsampler is recurrent: each rank starts this many frames before its range (docs/PARALLEL.md)
    warmup_frames: int = 4


@dataclass
class VideoConfig:
    """The clip the base stage makes; tsr multiplies fps, ssr multiplies height and width."""

    height: int = 128
    width: int = 128
    num_frames: int = 17  # 1 + 4k: the Wan VAE turns 1 + 4k frames into 1 + k latent frames
    fps: float = 16.0


@dataclass
class BaseSection(BaseStageConfig):
    resources: Resources = field(default_factory=Resources)  # of each rank
    parallel: DiTParallelConfig = field(default_factory=DiTParallelConfig)
    replicas: int = 1  # copies of the stage (each a group of parallel.world_size ranks)


@dataclass
class TsrSection(TsrStageConfig):
    resources: Resources = field(default_factory=Resources)
    parallel: FrameParallelConfig = field(default_factory=FrameParallelConfig)
    replicas: int = 1


@dataclass
class SsrSection(SsrStageConfig):
    resources: Resources = field(default_factory=Resources)
    parallel: SsrParallelConfig = field(default_factory=SsrParallelConfig)
    replicas: int = 1


@dataclass
class StagesConfig:
    base: BaseSection = field(default_factory=BaseSection)
    tsr: TsrSection = field(default_factory=TsrSection)
    ssr: SsrSection = field(default_factory=SsrSection)


@dataclass
class OutputConfig:
    preview_max_side: int = 256  # previews are downscaled so their longer side is at most this
    contact_sheet_frames: int = 4  # frames per stage on the PNG contact sheet
    video_quality: int = 18  # x264 CRF of the final MP4: 0 lossless … 51 worst
    max_prompts_in_flight: int = 3  # pipelining window for a prompts file
    # --resume starts a prompt after its last finished stage whose output was kept: the base latents
    # always (small); tsr's frames only with this (large: 3 bytes per pixel of every frame)
    keep_tsr_frames: bool = False


@dataclass
class CascadeConfig:
    name: str = "tiny"
    checkpoint: str = ""  # a Wan2.1 checkpoint folder; the Wan configs derive weights paths from it
    video: VideoConfig = field(default_factory=VideoConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # auto: GPU-to-GPU hops by Ray Direct Transport over NCCL, others through the object store (the
    # fastest on CPUs, docs/SCALING.md); object_store: every hop; direct: also CPU-to-CPU hops,
    # over gloo (slower on CPUs: the variant that tests the direct path without GPUs)
    transport: str = "auto"
    # how many times a stage call lost to a dead process (a crash, an out-of-memory kill, a lost node)
    # runs again on the restarted actor before its prompt fails; stages of one rank restart, reload
    # their models and rerun the call (split stages are not restarted: a lost rank fails its calls)
    retries: int = 2
    # how long a stage whose node was lost may take to come back (on a node that offers its resources)
    # before the run stops, leaving its unfinished prompts to --resume
    patience_s: float = 180.0


def _config_error(error: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return ConfigError(f"{origin}: {'key ' + repr(key) + ': ' if key else ''}{message}")


def _marked_required(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???` in a raw YAML tree."""
    if isinstance(tree, dict):
        return [key for name, value in tree.items() for key in _marked_required(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if tree == "???" else []


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CascadeConfig:
    """Reads a cascade config: defaults ← YAML file ← `key=value` overrides, then validates it.
    Returns the resolved `CascadeConfig` dataclass (interpolations such as `${checkpoint}` filled).
    A relative `path` missing from the working directory is looked up in the project's folder."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file() and not path.is_absolute() and (CONFIG_DIR.parent / path).is_file():
        path = CONFIG_DIR.parent / path  # the project's configs/... from any working directory
    if not path.is_file():
        known = ", ".join(str(p.relative_to(CONFIG_DIR.parent)) for p in sorted(CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {path} (known configs: {known})")
    merged: DictConfig = OmegaConf.structured(CascadeConfig)
    try:
        file_config = OmegaConf.load(path)
        merged = OmegaConf.merge(merged, file_config)
    except OmegaConfBaseException as error:
        raise _config_error(error, str(path)) from None
    except Exception as error:  # YAML syntax and the like
        raise ConfigError(f"cannot read config {path}: {error}") from None
    overridden = set()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. stages.base.steps=20)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise _config_error(error, f"override {item!r}") from None
        overridden.add(item.split("=", 1)[0].strip())
    # A `???` in the file marks a value the user must give; merging never fills it from defaults.
    missing = sorted(set(_marked_required(OmegaConf.to_container(file_config, resolve=False))) - overridden)
    if missing:
        raise ConfigError(
            f"{path.name} needs a value for {', '.join(missing)} "
            f"(e.g. {missing[0]}=/path/to/Wan2.1-T2V-1.3B on the command line)"
        )
    try:
        config: CascadeConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(error, str(path)) from None
    except ValueError as error:  # a model config's own check (its message names the field)
        raise ConfigError(f"{path.name}: {error}") from None
    validate(config)
    return config


def _require(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is not valid: {valid}")


def validate(config: CascadeConfig) -> None:
    """Checks values and cross-stage consistency; raises `ConfigError` naming the key."""
    video, base, tsr, ssr = config.video, config.stages.base, config.stages.tsr, config.stages.ssr
    for key in ("height", "width"):
        value = getattr(video, key)
        _require(value > 0 and value % 16 == 0, f"video.{key}", value, "a positive multiple of 16")
    _require(
        video.num_frames >= 1 and (video.num_frames - 1) % 4 == 0,
        "video.num_frames", video.num_frames, "1 + 4k frames (1, 5, 9, …, 81)",
    )
    _require(video.fps > 0, "video.fps", video.fps, "a positive frame rate")
    _require(1 <= tsr.factor <= MAX_FACTOR, "stages.tsr.factor", tsr.factor, f"an integer from 1 to {MAX_FACTOR}")
    from stages.tsr.stage import INTERPOLATORS

    _require(tsr.interpolator in INTERPOLATORS, "stages.tsr.interpolator", tsr.interpolator, f"one of {INTERPOLATORS}")
    _require(ssr.upsampler.scale in SCALES, "stages.ssr.upsampler.scale", ssr.upsampler.scale, f"one of {SCALES}")
    _require(base.steps >= 1, "stages.base.steps", base.steps, "at least 1")
    _require(base.shift > 0, "stages.base.shift", base.shift, "a positive number")
    _require(base.guidance_scale >= 1, "stages.base.guidance_scale", base.guidance_scale, "≥ 1 (1 turns guidance off)")
    from flows import SAMPLERS

    _require(base.sampler in SAMPLERS, "stages.base.sampler", base.sampler, f"one of {sorted(SAMPLERS)}")
    for stage_name in ("base", "tsr", "ssr"):
        section = getattr(config.stages, stage_name)
        _require(section.dtype in DTYPES, f"stages.{stage_name}.dtype", section.dtype, f"one of {DTYPES}")
        resources = section.resources
        _require(resources.num_gpus >= 0, f"stages.{stage_name}.resources.num_gpus", resources.num_gpus, "≥ 0")
        _require(resources.num_cpus >= 0, f"stages.{stage_name}.resources.num_cpus", resources.num_cpus, "≥ 0")
        _require(
            resources.num_cpus > 0 or resources.num_gpus > 0 or any(value > 0 for value in resources.custom.values()),
            f"stages.{stage_name}.resources", OmegaConf.to_container(OmegaConf.structured(resources)),
            "a rank must ask for some num_cpus, num_gpus or custom resource to be placed",
        )
        _require(section.parallel.placement in PLACEMENTS, f"stages.{stage_name}.parallel.placement",
                 section.parallel.placement, f"one of {PLACEMENTS}")
        _require(section.replicas >= 1, f"stages.{stage_name}.replicas", section.replicas, "at least 1")
    _require(config.retries >= 0, "retries", config.retries, "0 or more")
    _require(config.patience_s > 0, "patience_s", config.patience_s, "a number of seconds above 0")
    validate_parallel(config)
    _require(
        base.dit.text_dim == base.text_encoder.d_model,
        "stages.base.dit.text_dim", base.dit.text_dim,
        f"the text encoder's width stages.base.text_encoder.d_model={base.text_encoder.d_model}",
    )
    _require(
        base.dit.text_len == base.text_encoder.text_len,
        "stages.base.dit.text_len", base.dit.text_len,
        f"the text encoder's length stages.base.text_encoder.text_len={base.text_encoder.text_len}",
    )
    _require(
        base.dit.out_dim == tsr.vae.z_dim,
        "stages.base.dit.out_dim", base.dit.out_dim, f"the VAE's latent channels stages.tsr.vae.z_dim={tsr.vae.z_dim}",
    )
    out = config.output
    _require(out.preview_max_side >= 16, "output.preview_max_side", out.preview_max_side, "≥ 16")
    _require(out.contact_sheet_frames >= 1, "output.contact_sheet_frames", out.contact_sheet_frames, "≥ 1")
    _require(0 <= out.video_quality <= 51, "output.video_quality", out.video_quality, "an x264 CRF from 0 to 51")
    _require(out.max_prompts_in_flight >= 1, "output.max_prompts_in_flight", out.max_prompts_in_flight, "≥ 1")


def hop_backend(config: CascadeConfig, producer: str, consumer: str) -> str | None:
    """How a clip goes from stage `producer` to stage `consumer`: "nccl" (Ray Direct Transport between
    GPU actors), "gloo" (the same between CPU actors, only with transport=direct) or None (the object
    store, as numpy)."""
    on_gpus = [getattr(config.stages, name).resources.num_gpus > 0 for name in (producer, consumer)]
    if config.transport == "object_store" or on_gpus[0] != on_gpus[1]:
        return None
    if all(on_gpus):
        return "nccl"
    return "gloo" if config.transport == "direct" else None


def validate_parallel(config: CascadeConfig) -> None:
    """Checks the stages' rank counts against what their models can split."""
    base = config.stages.base
    split = base.parallel
    for key in ("ulysses", "ring"):
        _require(getattr(split, key) >= 1, f"stages.base.parallel.{key}", getattr(split, key), "at least 1")
    _require(
        base.dit.num_heads % split.ulysses == 0, "stages.base.parallel.ulysses", split.ulysses,
        f"a divisor of the DiT's {base.dit.num_heads} attention heads "
        f"({', '.join(str(d) for d in range(1, base.dit.num_heads + 1) if base.dit.num_heads % d == 0)})",
    )
    _require(split.cfg in (1, 2), "stages.base.parallel.cfg", split.cfg,
             "1, or 2 to run the conditional and unconditional branches on two halves of the group")
    _require(split.cfg == 1 or base.guidance_scale != 1, "stages.base.parallel.cfg", split.cfg,
             "1 when guidance is off (stages.base.guidance_scale=1 leaves no unconditional branch)")
    for stage_name in ("tsr", "ssr"):
        frames = getattr(config.stages, stage_name).parallel.frames
        _require(frames >= 1, f"stages.{stage_name}.parallel.frames", frames, "at least 1")
    warmup = config.stages.ssr.parallel.warmup_frames
    _require(warmup >= 0, "stages.ssr.parallel.warmup_frames", warmup, "≥ 0")
    _require(config.transport in TRANSPORTS, "transport", config.transport, f"one of {TRANSPORTS}")
    names = ("base", "tsr", "ssr")
    for producer, consumer in zip(names, names[1:]):
        if hop_backend(config, producer, consumer) == "gloo":
            for name in (producer, consumer):
                ranks = getattr(config.stages, name).parallel.world_size
                _require(ranks == 1, "transport", config.transport,
                         f"object_store or auto while stages.{name} runs on {ranks} CPU ranks: the gloo variant of "
                         "direct transport takes each process's torch.distributed group, which a split stage uses")


def to_plain_dict(config: CascadeConfig) -> dict:
    """The resolved config as plain containers, for the manifest."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
