"""A procedural captioned video world: the data the tiny cascade is trained on and checked against.

A clip shows one or two flat shapes (circle, square, triangle) in one of six colours, six hues 60°
apart, over a plain or softly textured background of low saturation, each shape moving in a straight
line in one of eight directions at a slow or fast speed, never leaving the frame. Every clip has
captions in English and Chinese, drawn from several phrasings:

    "a red circle moving to the right"        "红色的圆向右移动"
    "the fast blue square slides up"          "一个蓝色的方块快速地向上滑动"

The phrasings come in two sets: `train` ones, which the text encoder and the DiT learn from, and
`held_out` ones, which no model ever sees in training and on which the cascade is checked. Both sets
use the same words for colours, shapes, directions and speeds; only the sentences around them differ.

Positions, sizes and speeds are shares of the frame side, so one clip description renders at any
size (the ssr stage trains on 256² renders of what the base stage makes at 128²). Image coordinates:
x grows to the right, y grows downwards, so "up" is −y.

`measure_clip` reads the clip back (the hue of its most saturated object and that object's centroid
per frame): it is how tests and benchmarks check that a generated clip obeys its prompt.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------
# The vocabulary of the world

# name -> (hue in degrees, English words, Chinese words). Six hues 60° apart: a hue read off a
# generated clip names its colour unambiguously.
COLOURS: dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]] = {
    "red": (0.0, ("red",), ("红色", "红")),
    "yellow": (60.0, ("yellow",), ("黄色", "黄")),
    "green": (120.0, ("green",), ("绿色", "绿")),
    "cyan": (180.0, ("cyan",), ("青色", "青")),
    "blue": (240.0, ("blue",), ("蓝色", "蓝")),
    "purple": (300.0, ("purple", "magenta"), ("紫色", "紫")),
}
SHAPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (("circle", "ball", "disc"), ("圆", "圆形", "球")),
    "square": (("square", "block"), ("正方形", "方块")),
    "triangle": (("triangle",), ("三角形", "三角")),
}
# name -> (unit vector (x, y) in image coordinates, English phrases, Chinese phrases)
_DIAGONAL = 1 / math.sqrt(2)
DIRECTIONS: dict[str, tuple[tuple[float, float], tuple[str, ...], tuple[str, ...]]] = {
    "right": ((1.0, 0.0), ("to the right", "right", "rightwards"), ("向右", "往右")),
    "left": ((-1.0, 0.0), ("to the left", "left", "leftwards"), ("向左", "往左")),
    "up": ((0.0, -1.0), ("up", "upwards"), ("向上", "往上")),
    "down": ((0.0, 1.0), ("down", "downwards"), ("向下", "往下")),
    "up-right": ((_DIAGONAL, -_DIAGONAL), ("up and to the right", "diagonally up and right"), ("向右上方", "往右上")),
    "up-left": ((-_DIAGONAL, -_DIAGONAL), ("up and to the left", "diagonally up and left"), ("向左上方", "往左上")),
    "down-right": ((_DIAGONAL, _DIAGONAL), ("down and to the right", "diagonally down and right"), ("向右下方", "往右下")),
    "down-left": ((-_DIAGONAL, _DIAGONAL), ("down and to the left", "diagonally down and left"), ("向左下方", "往左下")),
}
# name -> (share of the frame side moved per frame, English adjective, adverb, Chinese adverb)
SPEEDS: dict[str, tuple[float, str, str, str]] = {
    "slow": (0.012, "slow", "slowly", "慢慢地"),
    "fast": (0.024, "fast", "quickly", "快速地"),
}

# Phrasings, {c} colour, {s} shape, {d} direction, {a} speed adjective, {v} speed adverb.
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "en": (
            "a {c} {s} moving {d}",
            "{c} {s} moves {d}",
            "the {c} {s} slides {d}",
            "a {a} {c} {s} going {d}",
            "a {c} {s} {v} moving {d}",
            "the {a} {c} {s} rolls {d}",
        ),
        "zh": (
            "{c}的{s}{d}移动",
            "一个{c}的{s}{d}移动",
            "{c}{s}{d}滑动",
            "一个{c}的{s}{v}{d}移动",
            "{c}的{s}{v}{d}滚动",
        ),
    },
    "held_out": {
        "en": (
            "there is a {c} {s} that travels {d}",
            "watch the {c} {s} drift {d}",
            "{c} {s}, heading {d} {v}",
        ),
        "zh": (
            "画面中有一个{c}的{s}正在{d}运动",
            "只见{c}的{s}{v}{d}飘去",
            "{s}是{c}的，它{d}走",
        ),
    },
}
TWO_OBJECT_JOINERS = {"en": " and ", "zh": "，"}
LANGUAGES = ("en", "zh")

# --------------------------------------------------------------------------------------------------
# Clip descriptions

SIZE_RANGE = (0.08, 0.13)  # radius of a shape, as a share of the frame side
EDGE_GAP = 0.02  # least room between a shape and the frame's edge, as a share of the frame side
BACKGROUND_SATURATION_MAX = 0.12  # backgrounds stay grey-ish, so the object is the saturated part
OBJECT_SATURATION = (0.8, 1.0)
OBJECT_VALUE = (0.75, 1.0)
HUE_JITTER = 8.0  # degrees a shape's hue may depart from its colour's


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    direction: str
    speed: str
    start: tuple[float, float]  # centre at frame 0, shares of the frame side (x, y)
    radius: float  # share of the frame side
    rgb: tuple[float, float, float]  # in [0, 1]


@dataclass(frozen=True)
class Background:
    rgb: tuple[float, float, float]  # in [0, 1]
    texture: str  # "plain", "noise" or "stripes"
    contrast: float  # amplitude of the texture, in [0, 1] units of brightness
    seed: int


@dataclass(frozen=True)
class WorldClip:
    objects: tuple[WorldObject, ...]
    background: Background


TEXTURES = ("plain", "noise", "stripes")


def _velocity(obj: WorldObject) -> tuple[float, float]:
    (dx, dy), speed = DIRECTIONS[obj.direction][0], SPEEDS[obj.speed][0]
    return dx * speed, dy * speed


def object_centre(obj: WorldObject, frame: float) -> tuple[float, float]:
    """Centre of `obj` at `frame` (fractional frames allowed), shares of the frame side."""
    vx, vy = _velocity(obj)
    return obj.start[0] + vx * frame, obj.start[1] + vy * frame


def frames_in_view(speed: str, direction: str) -> int:
    """The most frames a clip can have whose object of `speed` moving `direction` stays wholly
    inside the frame, at any size: beyond them its path is longer than the frame has room for."""
    (dx, dy), step = DIRECTIONS[direction][0], SPEEDS[speed][0]
    room = 1.0 - 2 * (SIZE_RANGE[1] + EDGE_GAP)  # for the centre of the largest shape
    return 1 + int(room / (step * max(abs(dx), abs(dy))) + 1e-9)


def _check_in_view(num_frames: int, speeds: Iterable[str], directions: Iterable[str]) -> None:
    """Raises ValueError when an object of one of `speeds` and `directions` cannot stay in view for
    `num_frames` frames (every clip of the world keeps its objects wholly inside the frame)."""
    limit, speed, direction = min((frames_in_view(speed, direction), speed, direction)
                                  for speed in speeds for direction in directions)
    if num_frames > limit:
        raise ValueError(
            f"num_frames={num_frames} is too long for the world: a {speed} object moving {direction} "
            f"({SPEEDS[speed][0]} of the frame side per frame) stays inside the frame for at most {limit} frames"
        )


def _random_object(rng: np.random.Generator, num_frames: int, colour: str | None = None, shape: str | None = None,
                   direction: str | None = None, speed: str | None = None,
                   speeds: Sequence[str] = tuple(SPEEDS)) -> WorldObject:
    """An object with the given attributes, the others (and its path, size and exact hue) random; a
    random speed is one of `speeds`."""
    colour, shape, direction, speed = (
        value if value is not None else str(rng.choice(list(names)))
        for value, names in ((colour, COLOURS), (shape, SHAPES), (direction, DIRECTIONS), (speed, speeds))
    )
    radius = float(rng.uniform(*SIZE_RANGE))
    (dx, dy), step = DIRECTIONS[direction][0], SPEEDS[speed][0]
    travel_x, travel_y = dx * step * (num_frames - 1), dy * step * (num_frames - 1)
    margin = radius + EDGE_GAP

    def start_along(travel: float) -> float:  # where to start so that the whole path stays inside
        low, high = margin - min(0.0, travel), 1.0 - margin - max(0.0, travel)
        return float(rng.uniform(low, high))

    hue = (COLOURS[colour][0] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    rgb = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(*OBJECT_SATURATION), rng.uniform(*OBJECT_VALUE))
    return WorldObject(colour, shape, direction, speed, (start_along(travel_x), start_along(travel_y)), radius,
                       tuple(float(v) for v in rgb))


def speeds_in_view(num_frames: int) -> list[str]:
    """The speeds whose objects stay in view for `num_frames` frames whatever their direction: both
    for 17 frames, the slow one alone for 33 or 49 (`frames_in_view`)."""
    return [speed for speed in SPEEDS if all(num_frames <= frames_in_view(speed, direction) for direction in DIRECTIONS)]


def random_clip(rng: np.random.Generator, num_frames: int, two_object_share: float = 0.2,
                speeds: Sequence[str] = tuple(SPEEDS)) -> WorldClip:
    """A random clip description: one object, or two of different colours with `two_object_share`,
    each moving at one of `speeds`."""
    _check_in_view(num_frames, speeds, DIRECTIONS)
    first = _random_object(rng, num_frames, speeds=speeds)
    objects = [first]
    if rng.random() < two_object_share:
        other_colours = [name for name in COLOURS if name != first.colour]
        objects.append(_random_object(rng, num_frames, str(rng.choice(other_colours)), speeds=speeds))
    return WorldClip(tuple(objects), _random_background(rng))


def _random_background(rng: np.random.Generator) -> Background:
    return Background(
        rgb=tuple(float(v) for v in colorsys.hsv_to_rgb(
            rng.random(), rng.uniform(0, BACKGROUND_SATURATION_MAX), rng.uniform(0.15, 0.85))),
        texture=str(rng.choice(TEXTURES)),
        contrast=float(rng.uniform(0.04, 0.12)),
        seed=int(rng.integers(2**31)),
    )


def clip_for(colour: str, shape: str, direction: str, speed: str, rng: np.random.Generator,
             num_frames: int) -> WorldClip:
    """A clip of one object with the given attributes (position, size and background random)."""
    for name, value, valid in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                               ("direction", direction, DIRECTIONS), ("speed", speed, SPEEDS)):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}: expected one of {list(valid)}")
    _check_in_view(num_frames, [speed], [direction])
    return WorldClip((_random_object(rng, num_frames, colour, shape, direction, speed),), _random_background(rng))


# --------------------------------------------------------------------------------------------------
# Rendering


def _background(background: Background, size: int) -> np.ndarray:  # (S, S, 3) float in [0, 1]
    rng = np.random.default_rng(background.seed)
    base = np.broadcast_to(np.asarray(background.rgb, dtype=np.float32), (size, size, 3))
    if background.texture == "plain":
        return base.copy()
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size
    if background.texture == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.1, 0.3)
        along = np.cos(angle) * coordinates[None, :] + np.sin(angle) * coordinates[:, None]
        pattern = np.sin(2 * math.pi * along / period)
    else:  # smooth noise: a coarse random grid, bilinearly upsampled
        cells = 5
        grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
        position = coordinates * cells
        index = np.minimum(position.astype(int), cells - 1)
        fraction = position - index
        rows = grid[index] * (1 - fraction)[:, None] + grid[index + 1] * fraction[:, None]  # (S, cells+1)
        pattern = rows[:, index] * (1 - fraction)[None, :] + rows[:, index + 1] * fraction[None, :]
    return np.clip(base + background.contrast * pattern[..., None], 0.0, 1.0)


def _signed_distance(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Distance to the shape's outline in pixels, negative inside; (x, y) relative to its centre."""
    if shape == "circle":
        return np.hypot(x, y) - radius
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85 * radius
    # an upright equilateral triangle with circumradius 1.2·radius: the largest of the distances
    # past its three edges (apothem = half the circumradius)
    circumradius = 1.2 * radius
    normals = ((0.0, 1.0), (math.sin(math.radians(120)), math.cos(math.radians(120))),
               (-math.sin(math.radians(120)), math.cos(math.radians(120))))
    return np.max([nx * x + ny * y for nx, ny in normals], axis=0) - circumradius / 2


def render_clip(clip: WorldClip, num_frames: int, size: int, time_step: float = 1.0, start: float = 0.0) -> np.ndarray:
    """(num_frames, size, size, 3) uint8: the clip drawn with anti-aliased edges, later objects on
    top; frame i shows the world at frame `start + i·time_step` (fractions draw in-between frames)."""
    background = _background(clip.background, size)
    pixel = np.arange(size, dtype=np.float32) + 0.5
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for index in range(num_frames):
        frame = background.copy()
        for obj in clip.objects:
            centre_x, centre_y = (value * size for value in object_centre(obj, start + index * time_step))
            distance = _signed_distance(obj.shape, pixel[None, :] - centre_x, pixel[:, None] - centre_y,
                                        obj.radius * size)
            alpha = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # one pixel of soft edge
            frame = frame * (1 - alpha) + np.asarray(obj.rgb, dtype=np.float32) * alpha
        frames[index] = np.round(frame * 255).astype(np.uint8)
    return frames


# --------------------------------------------------------------------------------------------------
# Captions


def _describe(obj: WorldObject, template: str, language: str, rng: np.random.Generator, mark: str = "") -> str:
    """`template` filled with words for `obj`, each word between two `mark`s."""
    pick = lambda words: mark + str(words[int(rng.integers(len(words)))]) + mark  # noqa: E731
    column = 0 if language == "en" else 1
    speed = SPEEDS[obj.speed]
    return template.format(
        c=pick(COLOURS[obj.colour][1 + column]),
        s=pick(SHAPES[obj.shape][column]),
        d=pick(DIRECTIONS[obj.direction][1 + column]),
        a=mark + speed[1] + mark,
        v=mark + (speed[2] if language == "en" else speed[3]) + mark,
    )


def _names_speed(template: str) -> bool:
    """Whether a phrasing has a word for its object's speed."""
    return "{a}" in template or "{v}" in template


def caption(clip: WorldClip, rng: np.random.Generator, split: str = "train", language: str | None = None,
            made_up_share: float = 0.0, speed_named_share: float | None = None) -> str:
    """A caption of `clip` in one of `split`'s phrasings, in `language` (random if None). Objects
    are described one after another, each in a phrasing of its own, drawn from all the phrasings
    or, where `speed_named_share` is given, from those that name the speed for that share of the
    objects and from the others for the rest. A share `made_up_share` of captions get made-up words
    put in (`add_made_up_words`)."""
    if split not in PHRASINGS:
        raise ValueError(f"unknown phrasing split {split!r}: expected one of {list(PHRASINGS)}")
    language = language if language is not None else str(rng.choice(LANGUAGES))
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}: expected one of {list(LANGUAGES)}")
    if speed_named_share is not None and not 0.0 <= speed_named_share <= 1.0:
        raise ValueError(f"speed_named_share must be in [0, 1] (or None for all phrasings alike), got {speed_named_share}")
    templates = PHRASINGS[split][language]
    made_up = rng.random() < made_up_share

    def phrasing() -> str:
        choices = templates
        if speed_named_share is not None:
            named = rng.random() < speed_named_share
            choices = [template for template in templates if _names_speed(template) == named]
        return choices[int(rng.integers(len(choices)))]

    parts = [_describe(obj, phrasing(), language, rng, SLOT if made_up else "") for obj in clip.objects]
    text = TWO_OBJECT_JOINERS[language].join(parts)
    return add_made_up_words(text, rng, language) if made_up else text


_ATTRIBUTE_WORDS = tuple(
    word
    for table, columns in ((COLOURS, (1, 2)), (SHAPES, (0, 1)), (DIRECTIONS, (1, 2)))
    for entry in table.values()
    for column in columns
    for phrase in entry[column]
    for word in phrase.split()
) + tuple(word for speed in SPEEDS.values() for word in speed[1:])
_ATTRIBUTE_CHARACTERS = set("".join(word for word in _ATTRIBUTE_WORDS if not word.isascii()))


def _made_up_word(rng: np.random.Generator, language: str) -> str:
    """A random word (Latin letters, or CJK characters) that holds no attribute word."""
    while True:
        if language == "en":
            word = "".join(chr(ord("a") + int(code)) for code in rng.integers(0, 26, int(rng.integers(2, 9))))
            if not any(attribute in word for attribute in _ATTRIBUTE_WORDS if attribute.isascii()):
                return word
        else:
            word = "".join(chr(int(code)) for code in rng.integers(0x4E00, 0x9FA6, int(rng.integers(1, 4))))
            if not set(word) & _ATTRIBUTE_CHARACTERS:
                return word


SLOT = "\x1f"  # marks the ends of the attribute words in a caption being built


def add_made_up_words(text: str, rng: np.random.Generator, language: str, max_words: int = 3) -> str:
    """`text` with 1 to `max_words` made-up words put in where they split no attribute word: at
    its ends, beside the attribute words (marked by SLOT where `caption` built the text), and, in
    English, between any two words. Training captions carry them so that the text encoder learns to
    pick the attribute words out of sentences it has never seen."""
    pieces = text.split(SLOT)  # attribute words at the odd positions
    if language == "en":
        pieces = [word for piece in pieces for word in piece.split(" ") if word]
    else:
        pieces = [piece for piece in pieces if piece]
    for _ in range(int(rng.integers(1, max_words + 1))):
        pieces.insert(int(rng.integers(0, len(pieces) + 1)), _made_up_word(rng, language))
    return (" " if language == "en" else "").join(pieces)


class PromptCase(NamedTuple):
    prompt: str
    colour: str
    shape: str
    direction: str
    speed: str


def held_out_prompts(count: int = 48, seed: int = 7) -> list[PromptCase]:
    """`count` single-object prompts in the held-out phrasings, half of them Chinese, cycling through
    every colour and direction so each is checked about equally often."""
    rng = np.random.default_rng(seed)
    colours, directions = list(COLOURS), list(DIRECTIONS)
    cases = []
    for index in range(count):
        colour = colours[index % len(colours)]
        direction = directions[(index // len(colours) + index) % len(directions)]
        shape, speed = str(rng.choice(list(SHAPES))), str(rng.choice(list(SPEEDS)))
        obj = WorldObject(colour, shape, direction, speed, (0.5, 0.5), 0.1, (0.0, 0.0, 0.0))
        language = LANGUAGES[index % 2]
        templates = PHRASINGS["held_out"][language]
        prompt = _describe(obj, templates[(index // 2) % len(templates)], language, rng)
        cases.append(PromptCase(prompt, colour, shape, direction, speed))
    return cases


# --------------------------------------------------------------------------------------------------
# Reading a clip back

OBJECT_SATURATION_THRESHOLD = 0.45  # pixels more saturated than this belong to an object
MIN_OBJECT_PIXELS = 6  # per frame, below which a frame has no object


class ClipMeasurement(NamedTuple):
    colour: str  # the palette colour nearest the saturated pixels' mean hue
    hue: float  # degrees
    centroids: np.ndarray  # (T, 2) x, y in pixels of the saturated pixels of that colour; NaN where absent


def _hue_saturation(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> hue in degrees and HSV saturation, both (...)."""
    rgb = frames.astype(np.float32) / 255.0
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0.0)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(chroma, 1e-6)
    hue = np.select(
        [high == red, high == green],
        [((green - blue) / safe) % 6.0, (blue - red) / safe + 2.0],
        (red - green) / safe + 4.0,
    ) * 60.0
    return hue, saturation


def _nearest_colour(hue: float) -> str:
    return min(COLOURS, key=lambda name: abs((hue - COLOURS[name][0] + 180.0) % 360.0 - 180.0))


def object_pixels(frames: np.ndarray) -> np.ndarray:
    """frames (..., 3) uint8 -> (...) bool: the pixels saturated enough to belong to an object."""
    return _hue_saturation(frames)[1] > OBJECT_SATURATION_THRESHOLD


def measure_clip(frames: np.ndarray) -> ClipMeasurement:
    """frames (T, H, W, 3) uint8 -> the dominant saturated colour and its centroid in every frame.

    The dominant colour is the palette colour with most saturated pixels over the clip; its mean hue
    is the circular mean of those pixels' hues; the centroids are of the pixels of that colour."""
    hue, _ = _hue_saturation(frames)
    saturated = object_pixels(frames)
    palette = np.array([COLOURS[name][0] for name in COLOURS])
    distance = np.abs((hue[..., None] - palette + 180.0) % 360.0 - 180.0)  # (T, H, W, colours)
    nearest = distance.argmin(-1)
    counts = [(saturated & (nearest == index)).sum() for index in range(len(palette))]
    dominant = int(np.argmax(counts))
    mask = saturated & (nearest == dominant)  # (T, H, W)
    radians = np.radians(hue[mask])
    mean_hue = float(np.degrees(np.arctan2(np.sin(radians).mean(), np.cos(radians).mean())) % 360.0) if mask.any() else float("nan")
    rows, columns = np.arange(frames.shape[1]) + 0.5, np.arange(frames.shape[2]) + 0.5
    centroids = np.full((frames.shape[0], 2), np.nan)
    for index, frame_mask in enumerate(mask):
        total = frame_mask.sum()
        if total >= MIN_OBJECT_PIXELS:
            centroids[index] = (frame_mask.sum(0) @ columns / total, frame_mask.sum(1) @ rows / total)
    return ClipMeasurement(list(COLOURS)[dominant], mean_hue, centroids)


def motion_direction(centroids: np.ndarray) -> tuple[str, float]:
    """The world direction nearest the centroid's motion from its first to its last sighting, and
    the length of that motion in pixels ("none", 0 when the object is seen in fewer than 2 frames)."""
    seen = centroids[~np.isnan(centroids).any(1)]
    if len(seen) < 2:
        return "none", 0.0
    motion = seen[-1] - seen[0]
    length = float(np.hypot(*motion))
    if length == 0:
        return "none", 0.0
    return max(DIRECTIONS, key=lambda name: float(np.dot(DIRECTIONS[name][0], motion))), length


# --------------------------------------------------------------------------------------------------
# Batches for training


def world_batch(step: int, seed: int, batch_size: int, num_frames: int, size: int,
                two_object_share: float = 0.2, speeds: Sequence[str] = tuple(SPEEDS)) -> tuple[np.ndarray, list[WorldClip]]:
    """(B, num_frames, size, size, 3) uint8 clips and their descriptions, a function of (step, seed)
    alone, so a resumed training run sees the batches it would have seen."""
    clips = world_clips(step, seed, batch_size, num_frames, two_object_share, speeds)
    return np.stack([render_clip(clip, num_frames, size) for clip in clips]), clips


def world_crops(step: int, seed: int, batch_size: int, num_frames: int, crop_size: int, frame_size: int,
                time_step: float = 1.0, clip_frames: int = 17) -> np.ndarray:
    """(B, num_frames, crop_size, crop_size, 3) uint8 training clips for the tsr and ssr models: world
    clips of `clip_frames` frames rendered at `frame_size` from a random start, `time_step` world
    frames apart (1/3: the in-between frames a ×3 interpolation makes), each cropped at random."""
    if not 0 < crop_size <= frame_size:
        raise ValueError(f"crop_size {crop_size} must be from 1 to the world frame size {frame_size}")
    span = (num_frames - 1) * time_step
    if span > clip_frames - 1:
        raise ValueError(f"{num_frames} frames {time_step} apart span {span} world frames, more than {clip_frames - 1}")
    rng = np.random.default_rng([seed, step, 3])
    crops = []
    for clip in world_clips(step, seed, batch_size, clip_frames):
        frames = render_clip(clip, num_frames, frame_size, time_step, float(rng.uniform(0, clip_frames - 1 - span)))
        top, left = rng.integers(0, frame_size - crop_size + 1, 2)
        crops.append(frames[:, top : top + crop_size, left : left + crop_size])
    return np.stack(crops)


def world_clips(step: int, seed: int, batch_size: int, num_frames: int, two_object_share: float = 0.2,
                speeds: Sequence[str] = tuple(SPEEDS)) -> list[WorldClip]:
    """The descriptions of `world_batch`'s clips, without rendering them."""
    rng = np.random.default_rng([seed, step])
    return [random_clip(rng, num_frames, two_object_share, speeds) for _ in range(batch_size)]
