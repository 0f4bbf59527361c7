"""The shapes world's scenes: what an image holds (1-4 flat shapes in distinct quadrants), how scenes are drawn
from a seed, and how they are rendered. Texts about a scene are in :mod:`mobilemllm.data.shapes_text`; the
files of a split are written by :mod:`mobilemllm.data.shapes`."""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (170, 0, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
OBJECTS: tuple[str, ...] = tuple(f"{c} {k}" for c in COLOURS for k in KINDS)

BACKGROUND: tuple[int, int, int] = (40, 40, 40)
BACKGROUND_NOISE = 6  # +- grey levels of per-pixel background noise
# Side of a shape's bounding box, as a fraction of the quadrant side.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.85}
# Largest centre jitter, as a fraction of the quadrant side (keeps every shape inside its quadrant).
MAX_JITTER: dict[str, float] = {"small": 0.12, "large": 0.05}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene. ``dx``/``dy`` shift the centre, in fractions of the quadrant side."""

    kind: str
    colour: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")

    @property
    def object(self) -> str:
        """The "colour kind" name, e.g. ``"red circle"``."""
        return f"{self.colour} {self.kind}"

    def phrase(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.colour} {self.kind}"


@dataclass
class Scene:
    """An image's content: its shapes, in fixed quadrant order, and its id (the image file stem)."""

    shapes: list[Shape]
    id: str = ""

    @property
    def objects(self) -> list[str]:
        """The objects present, one per shape, in quadrant order (may repeat)."""
        return [s.object for s in self.shapes]

    @property
    def positions(self) -> list[str]:
        return [s.position for s in self.shapes]

    def at(self, position: str) -> Shape | None:
        """The shape in ``position``, or None."""
        for s in self.shapes:
            if s.position == position:
                return s
        return None

    def free_positions(self) -> list[str]:
        taken = set(self.positions)
        return [p for p in POSITIONS if p not in taken]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "shapes": [asdict(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(shapes=[Shape(**s) for s in d["shapes"]], id=d.get("id", ""))


# --------------------------------------------------------------------------------------- scenes


def scene_id(seed: int, idx: int) -> str:
    """The id (and image file stem) of scene ``idx`` of the split generated with ``seed``."""
    return f"shapes_{seed}_{idx:06d}"


def _rng(seed: int, idx: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and processes.
    return random.Random(f"mobilemllm-shapes:{stream}:{seed}:{idx}")


def sample_scene(rng: random.Random, idx: int, seed: int = 0) -> Scene:
    """Draw a scene of 1-4 shapes in distinct quadrants; its id is ``scene_id(seed, idx)``."""
    n = rng.randint(1, 4)
    taken = set(rng.sample(POSITIONS, n))
    shapes = []
    for position in POSITIONS:  # fixed quadrant order
        if position not in taken:
            continue
        kind = rng.choice(KINDS)
        colour = rng.choice(tuple(COLOURS))
        size = rng.choice(SIZES)
        j = MAX_JITTER[size]
        dx = round(rng.uniform(-j, j), 4)
        dy = round(rng.uniform(-j, j), 4)
        shapes.append(Shape(kind, colour, size, position, dx, dy))
    return Scene(shapes=shapes, id=scene_id(seed, idx))


def shape_center(shape: Shape, image_size: int = 32) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of ``shape`` in an image of side ``image_size``."""
    q = image_size / 2
    row = 0 if shape.position.startswith("top") else 1
    col = 0 if shape.position.endswith("left") else 1
    return ((col + 0.5 + shape.dx) * q, (row + 0.5 + shape.dy) * q)


def shape_box(shape: Shape, image_size: int = 32) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of ``shape`` in pixels."""
    cx, cy = shape_center(shape, image_size)
    r = SIZE_FRACTION[shape.size] * image_size / 4  # half of (fraction * quadrant side)
    return (cx - r, cy - r, cx + r, cy + r)


def render(scene: Scene, image_size: int = 32) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``image_size`` (a pure function of the scene)."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    noise_rng = np.random.default_rng(zlib.crc32(scene.id.encode("utf-8")))
    grey = noise_rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(image_size, image_size, 1))
    pixels = np.clip(np.asarray(BACKGROUND, dtype=np.int16) + grey, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = shape_box(s, image_size)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return img
