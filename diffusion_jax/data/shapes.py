"""A generated data set of coloured shapes on a dark background.

Each image shows one shape (circle, square or triangle) in one colour (red, green, blue or
yellow) with a random size, position and rotation. Image `i` is a pure function of `(seed, i)`: it
is rendered on demand from a generator seeded with `[seed, i]`, so the set costs no memory and no
disk, and every process of a multi-host run sees the same pixels.

The label is the index of the (shape, colour) pair, and captions and attributes ("small", "top
left", ...) come with every image so that the same set serves unconditional, class-conditional and
text-conditional models.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
# Saturated, well separated RGB values: the colour must survive 32x32 down-sampling and stay
# unambiguous to a test (or a caption model) that looks only at the mean of the bright pixels.
COLOUR_RGB = {
  "red": (225, 45, 40),
  "green": (45, 195, 70),
  "blue": (50, 100, 240),
  "yellow": (240, 215, 45),
}
# Side fraction covered by the shape's circumscribed circle. Sizes below the split are "small".
MIN_SIZE, MAX_SIZE, SIZE_SPLIT = 0.5, 0.9, 0.7
# A disc fills its circumscribed circle while polygons do not; shrinking discs keeps the visual
# sizes of the kinds comparable.
_CIRCLE_SCALE = 0.85
# Rendering at 4x and box-filtering down gives 16 coverage samples per pixel: clean edges.
_SUPERSAMPLE = 4


def _position_bucket(cx: float, cy: float) -> str:
  """Names the cell of a 3x3 grid holding the point (fractions of the side, y pointing down)."""
  row = ("top", "", "bottom")[min(int(cy * 3), 2)]
  col = ("left", "", "right")[min(int(cx * 3), 2)]
  return " ".join(part for part in (row, col) if part) or "centre"


def _where(position: str) -> str:
  """The phrase of a position: "at the top", "on the left", "in the top left", "in the centre"."""
  phrase = {"top": "at the top", "bottom": "at the bottom", "left": "on the left"}.get(position)
  return phrase or ("on the right" if position == "right" else f"in the {position}")


class ShapesSource:
  """Random-access source of generated shape images.

  Attributes:
    num_classes: number of (shape, colour) pairs, 12.
    class_names: `num_classes` strings such as "red circle"; label = shape * 4 + colour.
  """

  def __init__(
    self, num_examples: int, image_size: int = 32, *, seed: int = 0, exclude: tuple[str, ...] = ()
  ):
    """Creates the source.

    Args:
      num_examples: number of images in the set, > 0.
      image_size: side of the square images in pixels.
      seed: selects the set; image i is a pure function of (seed, i).
      exclude: class names ("green triangle", ...) that the set leaves out, e.g. to test how a
        text-conditional model composes a colour and a shape it never saw together. The set then
        cycles through the other classes.

    Raises:
      ValueError: an excluded name is not a class, or every class is excluded.
    """
    self._num_examples = int(num_examples)
    self._image_size = int(image_size)
    self._seed = int(seed)
    self.num_classes = len(SHAPES) * len(COLOURS)
    self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    unknown = [name for name in exclude if name not in self.class_names]
    if unknown:
      raise ValueError(
        f"{', '.join(map(repr, unknown))} is not a shapes class; classes: "
        f"{', '.join(self.class_names)}"
      )
    self._labels = [i for i, name in enumerate(self.class_names) if name not in exclude]
    if not self._labels:
      raise ValueError("every shapes class is excluded")

  def __len__(self) -> int:
    return self._num_examples

  def _params(self, index: int) -> dict:
    """Draws every random choice of image `index` from its own generator."""
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} shapes")
    # Labels cycle through the classes so that every class has the same count (+-1); the rest of
    # the image is random.
    label = self._labels[index % len(self._labels)]
    rng = np.random.default_rng([self._seed, index])
    size, angle, px, py, bg, *jitter = rng.random(8)
    size = MIN_SIZE + (MAX_SIZE - MIN_SIZE) * size
    radius = size / 2
    # The circumscribed circle stays inside the image, so no shape is ever clipped and the corner
    # pixels are always background.
    cx = radius + (1 - 2 * radius) * px
    cy = radius + (1 - 2 * radius) * py
    base = COLOUR_RGB[COLOURS[label % len(COLOURS)]]
    # A little jitter per channel: shades vary, hues stay unambiguous.
    colour = tuple(
      min(255, max(0, int(v + 30 * (j - 0.5)))) for v, j in zip(base, jitter, strict=True)
    )
    return {
      "label": label,
      "size": size,
      "angle": 2 * math.pi * angle,
      "cx": cx,
      "cy": cy,
      "background": int(8 + 28 * bg),
      "colour": colour,
    }

  def attributes(self, index: int) -> dict[str, str]:
    """Describes image `index` in words, for captions and text conditioning.

    Args:
      index: int in [0, len(self)).

    Returns:
      A dict of strings: "shape" (one of SHAPES), "colour" (one of COLOURS), "size" ("small" or
      "large"), "position" (a 3x3 grid cell: "top left", "top", ..., "centre", ..., "bottom
      right"), "caption" (e.g. "a red circle") and "description" (e.g. "a small red circle in
      the top left").
    """
    p = self._params(int(index))
    shape = SHAPES[p["label"] // len(COLOURS)]
    colour = COLOURS[p["label"] % len(COLOURS)]
    size = "small" if p["size"] < SIZE_SPLIT else "large"
    position = _position_bucket(p["cx"], p["cy"])
    return {
      "shape": shape,
      "colour": colour,
      "size": size,
      "position": position,
      "caption": f"a {colour} {shape}",
      "description": f"a {size} {colour} {shape} {_where(position)}",
    }

  def caption(self, index: int, rng: np.random.Generator) -> str:
    """A compositional caption of image `index`: its colour and shape, and each of its size and
    position with probability 1/2 (drawn from `rng`): "a red circle", "a small red circle",
    "a red circle in the top left", "a large red circle at the bottom"."""
    a = self.attributes(index)
    with_size, with_position = rng.random(2) < 0.5
    words = ["a", a["size"]] if with_size else ["a"]
    words += [a["colour"], a["shape"]]
    if with_position:
      words.append(_where(a["position"]))
    return " ".join(words)

  def caption_words(self) -> list[str]:
    """Every word a caption can contain."""
    cells = [_position_bucket(x, y) for x in (0.1, 0.5, 0.9) for y in (0.1, 0.5, 0.9)]
    phrases = ["a", "small", "large", *COLOURS, *SHAPES, *(_where(c) for c in cells)]
    return sorted({w for phrase in phrases for w in phrase.split()})

  def _render(self, p: dict) -> np.ndarray:
    s = self._image_size * _SUPERSAMPLE
    bg = p["background"]
    # A faint blue tint: the background is dark but not an exact grey.
    canvas = Image.new("RGB", (s, s), (bg, bg, bg + 6))
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = p["cx"] * s, p["cy"] * s, p["size"] * s / 2
    kind = SHAPES[p["label"] // len(COLOURS)]
    if kind == "circle":
      r *= _CIRCLE_SCALE
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=p["colour"])
    else:
      n = 4 if kind == "square" else 3
      a0 = p["angle"]
      points = [
        (cx + r * math.cos(a0 + 2 * math.pi * k / n), cy + r * math.sin(a0 + 2 * math.pi * k / n))
        for k in range(n)
      ]
      draw.polygon(points, fill=p["colour"])
    return np.asarray(canvas.reduce(_SUPERSAMPLE))

  def __getitem__(self, index: int) -> dict:
    """Renders image `index`.

    Args:
      index: int in [0, len(self)).

    Returns:
      {"image": uint8 [S, S, 3] in [0, 255], "label": int32 scalar in [0, 12),
       "caption": str such as "a red circle"}.
    """
    index = int(index)
    p = self._params(index)
    shape = SHAPES[p["label"] // len(COLOURS)]
    colour = COLOURS[p["label"] % len(COLOURS)]
    return {
      "image": self._render(p),
      "label": np.int32(p["label"]),
      "caption": f"a {colour} {shape}",
    }
