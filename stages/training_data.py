"""Training clips for the tsr and ssr stages, from still photos or from a folder of videos.

No data set ships with the project, so clips are synthesised from scikit-image's bundled photos: a
camera moves over a photo with constant velocity (pan, zoom and rotation), and up to two patches
move across the view on their own, occluding what lies behind. Every frame is rendered from the
full photo with bicubic resampling, never from the previous frame, so no blur accumulates and the
frame in the middle of a clip is exactly the frame an interpolator should produce between its ends.

The photos are split once, here, into a training set and a held-out set the benchmarks evaluate on;
a clip's overlays come from a photo of its own split, so nothing held out is ever trained on.
Users with their own footage pass a folder of videos instead (`video_clips`).

Sizes are in pixels of the rendered frame. Motion is per frame step: `max_motion` bounds how far
any point of the view moves between two consecutive frames.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cascade.video import read_video
from stages.world import world_crops

# skimage.data photos that load offline. `cat` is the same picture as `chelsea`, so only one is used;
# `stereo_motorcycle` is its left view. Photos smaller than ~300 px (page, text) and binary or
# synthetic test patterns (binary_blobs, horse, checkerboard, shepp_logan_phantom) are left out.
HELD_OUT_PHOTOS: tuple[str, ...] = ("astronaut", "camera", "coffee", "rocket")
TRAINING_PHOTOS: tuple[str, ...] = (
    "brick",
    "cell",
    "chelsea",
    "clock",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "retina",
    "stereo_motorcycle",
)
SPLITS = {"train": TRAINING_PHOTOS, "held_out": HELD_OUT_PHOTOS}
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")

BORDER_MARGIN = 3.0  # pixels kept between the view and the photo's edge: bicubic reads 2 beyond
LARGEST_VIEW_SHARE = 0.9  # the view spans at most this share of the photo, after the motion
PAN_SHARE = (0.5, 1.0)  # share of a clip's motion budget spent on panning; the rest rotates and zooms
OVERLAY_HALF_SIZE = (0.1, 0.25)  # half-width and half-height of an overlay, as shares of the frame
MAX_OVERLAYS = 2


# ---------------------------------------------------------------------------------------------------
# Photos


@functools.lru_cache(maxsize=None)
def _cached_photo(name: str) -> np.ndarray:
    from skimage import data

    if name not in TRAINING_PHOTOS + HELD_OUT_PHOTOS:
        raise ValueError(f"unknown photo {name!r}: expected one of {sorted(TRAINING_PHOTOS + HELD_OUT_PHOTOS)}")
    photo = getattr(data, name)()
    if name == "stereo_motorcycle":
        photo = photo[0]  # (left, right, disparity): the left view
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    photo = np.ascontiguousarray(photo[..., :3])  # logo carries an (opaque) alpha channel
    photo.setflags(write=False)
    return photo


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grey photos repeated over three channels."""
    return _cached_photo(name).copy()


def _photo_tensor(photo: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 255]."""
    return torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float()


def _sample(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bicubic samples of image (1, C, H, W) at pixel positions x, y (N, h, w) -> (N, C, h, w)."""
    height, width = image.shape[-2:]
    grid = torch.stack((x * (2 / (width - 1)) - 1, y * (2 / (height - 1)) - 1), dim=-1)  # (N, h, w, 2)
    count, rows = grid.shape[0], grid.shape[1]
    samples = F.grid_sample(
        image, grid.reshape(1, count * rows, *grid.shape[2:]).float(),
        mode="bicubic", padding_mode="border", align_corners=True,
    )  # (1, C, N·h, w)
    return samples.reshape(image.shape[1], count, rows, -1).transpose(0, 1)


def _frame_offsets(num_frames: int) -> torch.Tensor:
    """Each frame's time relative to the middle of the clip, in frame steps: (T,) float64."""
    return torch.arange(num_frames, dtype=torch.float64) - (num_frames - 1) / 2


def _view_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates relative to the frame centre, (size, size) each, float64."""
    coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    ys, xs = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return xs, ys


# ---------------------------------------------------------------------------------------------------
# Camera and overlays


@dataclass(frozen=True)
class CameraMotion:
    """A camera over a photo at constant velocity, described at the clip's middle frame.

    Frame k (time offset s = k − (T−1)/2 from the middle) maps its pixel q, relative to the frame
    centre, to the photo position centre + s·velocity + exp(s·zoom_rate)·R(angle + s·angular_velocity)·q.
    Positions in photo pixels; angles in radians.
    """

    centre: tuple[float, float]  # (x, y) of the view centre at the middle frame
    velocity: tuple[float, float] = (0.0, 0.0)  # photo pixels per frame step
    angle: float = 0.0
    angular_velocity: float = 0.0  # per frame step
    zoom_rate: float = 0.0  # log of the view's scale change per frame step


@dataclass(frozen=True)
class Overlay:
    """A patch moving at constant velocity in front of the camera, in frame pixels."""

    texture: np.ndarray  # (h, w, 3) uint8, shown centred on the patch
    elliptical: bool  # an ellipse, else a rectangle
    centre: tuple[float, float]  # (x, y) at the middle frame, in frame pixels from the top left
    velocity: tuple[float, float]  # frame pixels per frame step
    half_size: tuple[float, float]  # half-width, half-height


def render_camera(photo: np.ndarray, motion: CameraMotion, num_frames: int, size: int) -> torch.Tensor:
    """The photo (H, W, 3) uint8 seen by `motion`: (T, 3, size, size) float32 in [0, 255]."""
    s = _frame_offsets(num_frames).view(-1, 1, 1)  # (T, 1, 1)
    qx, qy = _view_grid(size)
    scale = torch.exp(s * motion.zoom_rate)
    angle = motion.angle + s * motion.angular_velocity
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    x = motion.centre[0] + s * motion.velocity[0] + cos * qx - sin * qy  # (T, size, size)
    y = motion.centre[1] + s * motion.velocity[1] + sin * qx + cos * qy
    return _sample(_photo_tensor(photo), x, y)


def composite_overlay(frames: torch.Tensor, overlay: Overlay) -> torch.Tensor:
    """Paints `overlay` over frames (T, 3, size, size) in [0, 255], with anti-aliased edges."""
    num_frames, size = frames.shape[0], frames.shape[-1]
    s = _frame_offsets(num_frames).view(-1, 1, 1)
    xs, ys = _view_grid(size)
    # Pixel positions relative to the patch centre, (T, size, size).
    local_x = xs + (size - 1) / 2 - (overlay.centre[0] + s * overlay.velocity[0])
    local_y = ys + (size - 1) / 2 - (overlay.centre[1] + s * overlay.velocity[1])
    half_x, half_y = overlay.half_size
    if overlay.elliptical:
        # Signed distance to the edge, to first order: −f/|∇f| for f = (x/a)² + (y/b)² − 1.
        implicit = (local_x / half_x) ** 2 + (local_y / half_y) ** 2 - 1
        gradient = 2 * torch.sqrt((local_x / half_x**2) ** 2 + (local_y / half_y**2) ** 2)
        inside = -implicit / gradient.clamp_min(1e-6)
    else:
        inside = torch.minimum(half_x - local_x.abs(), half_y - local_y.abs())
    alpha = (inside + 0.5).clamp(0, 1).unsqueeze(1).float()  # (T, 1, size, size)
    texture = overlay.texture
    patch = _sample(
        _photo_tensor(texture), local_x + (texture.shape[1] - 1) / 2, local_y + (texture.shape[0] - 1) / 2
    )
    return alpha * patch + (1 - alpha) * frames


def _prescale(photo: np.ndarray, factor: float) -> np.ndarray:
    """The photo shrunk (factor > 1) or enlarged (factor < 1) with a Lanczos filter."""
    height, width = photo.shape[:2]
    new_size = (max(1, round(width / factor)), max(1, round(height / factor)))
    if new_size == (width, height):
        return photo
    return np.array(Image.fromarray(photo).resize(new_size, Image.LANCZOS))


def _random_camera(
    photo: np.ndarray, num_frames: int, size: int, rng: np.random.Generator, max_motion: float
) -> tuple[np.ndarray, CameraMotion]:
    """A random camera path and the photo rescaled so that the whole path stays inside it."""
    budget = rng.uniform(0, max_motion)  # frame pixels per step, at the farthest corner
    reach = size / math.sqrt(2)  # distance of a corner from the frame centre
    pan = budget * rng.uniform(*PAN_SHARE)
    rotation_share = rng.uniform(0, 1)
    heading = rng.uniform(0, 2 * math.pi)
    angle = rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else 0.0
    velocity = (pan * math.cos(heading), pan * math.sin(heading))
    angular_velocity = rng.choice((-1, 1)) * (budget - pan) * rotation_share / reach
    zoom_rate = rng.choice((-1, 1)) * (budget - pan) * (1 - rotation_share) / reach

    # The extent of every frame's corners around the middle frame's centre, in frame pixels.
    s = _frame_offsets(num_frames).numpy()[:, None]
    corner = (size - 1) / 2 + BORDER_MARGIN
    corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=np.float64) * corner  # (4, 2)
    scale = np.exp(s * zoom_rate)
    turn = angle + s * angular_velocity
    xs = s * velocity[0] + scale * (np.cos(turn) * corners[:, 0] - np.sin(turn) * corners[:, 1])  # (T, 4)
    ys = s * velocity[1] + scale * (np.sin(turn) * corners[:, 0] + np.cos(turn) * corners[:, 1])
    extent_x, extent_y = xs.max() - xs.min(), ys.max() - ys.min()

    # One frame pixel is `factor` photo pixels: from 1 (full detail) up to the view filling most of
    # the photo; photos too small for the path are enlarged instead.
    height, width = photo.shape[:2]
    largest = LARGEST_VIEW_SHARE * min(width / extent_x, height / extent_y)
    factor = math.exp(rng.uniform(0, math.log(largest))) if largest > 1 else largest
    scaled = _prescale(photo, factor)
    height, width = scaled.shape[:2]
    low_x, high_x = -xs.min(), width - 1 - xs.max()
    low_y, high_y = -ys.min(), height - 1 - ys.max()
    centre = (
        rng.uniform(low_x, high_x) if high_x > low_x else (width - 1) / 2,
        rng.uniform(low_y, high_y) if high_y > low_y else (height - 1) / 2,
    )
    return scaled, CameraMotion(centre, velocity, angle, angular_velocity, zoom_rate)


def _random_overlay(source: np.ndarray, size: int, rng: np.random.Generator, max_motion: float) -> Overlay:
    """A rectangle or ellipse, textured with a crop of `source` or a flat colour, on a straight path."""
    half_size = tuple(float(rng.uniform(*OVERLAY_HALF_SIZE) * size) for _ in range(2))
    texture_height, texture_width = (2 * math.ceil(half) + 4 for half in reversed(half_size))
    if rng.random() < 0.7 and source.shape[0] > texture_height and source.shape[1] > texture_width:
        top = int(rng.integers(0, source.shape[0] - texture_height + 1))
        left = int(rng.integers(0, source.shape[1] - texture_width + 1))
        texture = source[top : top + texture_height, left : left + texture_width]
    else:
        texture = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (texture_height, texture_width, 3))
    speed, heading = rng.uniform(0, max_motion), rng.uniform(0, 2 * math.pi)
    return Overlay(
        texture=np.ascontiguousarray(texture),
        elliptical=bool(rng.random() < 0.5),
        centre=(float(rng.uniform(0, size - 1)), float(rng.uniform(0, size - 1))),
        velocity=(speed * math.cos(heading), speed * math.sin(heading)),
        half_size=half_size,
    )


def synthetic_clip(
    photo: np.ndarray,
    num_frames: int,
    size: int,
    rng: np.random.Generator,
    max_motion: float = 8.0,
    overlay_photo: np.ndarray | None = None,
) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: a camera moving over `photo` plus 0–2 occluding overlays.

    The camera pans, zooms and rotates at constant rates, and the overlays move at constant
    velocity, so the frame at the middle time is the true intermediate of its neighbours. No point
    of the camera view moves more than `max_motion` pixels per frame step, nor does any overlay.
    Overlays are crops of `overlay_photo` (default: of `photo`, with its colour channels permuted)
    or flat colours.
    """
    if num_frames < 1 or size < 4:
        raise ValueError(f"need num_frames >= 1 and size >= 4, got num_frames={num_frames}, size={size}")
    if max_motion < 0:
        raise ValueError(f"max_motion must be >= 0, got {max_motion}")
    if rng.random() < 0.5:
        photo = np.ascontiguousarray(photo[:, ::-1])
    scaled, motion = _random_camera(photo, num_frames, size, rng, max_motion)
    frames = render_camera(scaled, motion, num_frames, size)
    source = overlay_photo if overlay_photo is not None else photo[..., rng.permutation(3)]
    for _ in range(int(rng.integers(0, MAX_OVERLAYS + 1))):
        frames = composite_overlay(frames, _random_overlay(source, size, rng, max_motion))
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------------
# Videos


def video_files(folder: Path) -> list[Path]:
    """The videos directly in `folder`, sorted by name; ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"videos folder not found: {folder}")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    return files


@functools.lru_cache(maxsize=2)
def _decoded_video(path: Path) -> np.ndarray:
    return read_video(str(path))[0]


def _video_crop(path: Path, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray | None:
    """Random size × size crop of num_frames consecutive frames of one video, or None if too small."""
    frames = _decoded_video(path)
    count, height, width = frames.shape[:3]
    if count < num_frames or height < size or width < size:
        return None
    start = int(rng.integers(0, count - num_frames + 1))
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return np.ascontiguousarray(frames[start : start + num_frames, top : top + size, left : left + size])


def _random_video_clip(files: list[Path], num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    for index in rng.permutation(len(files)):
        clip = _video_crop(files[index], num_frames, size, rng)
        if clip is not None:
            return clip
    raise ValueError(
        f"no video in {files[0].parent} has {num_frames} frames of at least {size}×{size} pixels"
    )


def video_clips(folder: Path, num_frames: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless random crops (num_frames, size, size, 3) uint8 of consecutive frames, each from a
    video of `folder` drawn at random; videos too short or too small are skipped."""
    files = video_files(folder)
    while True:
        yield _random_video_clip(files, num_frames, size, rng)


# ---------------------------------------------------------------------------------------------------
# Batches


@dataclass
class WorldSource:
    """Training on the procedural world (stages/world.py) instead of photos: clips rendered at
    `frame_size` (the size the stage sees: 128 for the tiny cascade's tsr, 256 for its ×2 ssr
    targets) with `time_step` world frames between consecutive training frames."""

    frame_size: int = 128
    time_step: float = 1.0


def clip_source(videos: Path | None, world: bool) -> str:
    """What `clip_batch` draws training clips from, in words, for a run's record."""
    if videos is not None:
        return f"videos in {videos}"
    if world:
        return "procedural world clips (stages/world.py)"
    return f"synthetic clips of the photos {', '.join(TRAINING_PHOTOS)}"


def clip_batch(
    step: int,
    seed: int,
    batch_size: int,
    num_frames: int,
    size: int,
    videos: Path | None = None,
    split: str = "train",
    max_motion: float = 8.0,
    world: WorldSource | None = None,
) -> np.ndarray:
    """(B, num_frames, size, size, 3) uint8, a function of (step, seed) alone, so a resumed training
    run sees the batches it would have seen. Synthetic clips of the `split`'s photos, crops of the
    videos in `videos` (training data only: there is no held-out split of a user's folder), or crops
    of procedural world clips (`world`)."""
    if world is not None:
        if videos is not None:
            raise ValueError("train on a videos folder or on the procedural world, not both")
        return world_crops(step, seed, batch_size, num_frames, size, world.frame_size, world.time_step)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLITS)}")
    if videos is not None and split != "train":
        raise ValueError(f"a videos folder is training data only; split must be 'train', got {split!r}")
    rng = np.random.default_rng([seed, step, list(SPLITS).index(split)])
    if videos is not None:
        files = video_files(videos)
        return np.stack([_random_video_clip(files, num_frames, size, rng) for _ in range(batch_size)])
    photos = SPLITS[split]
    clips = []
    for _ in range(batch_size):
        photo, overlay_photo = (load_photo(photos[int(index)]) for index in rng.integers(0, len(photos), 2))
        clips.append(synthetic_clip(photo, num_frames, size, rng, max_motion, overlay_photo))
    return np.stack(clips)
