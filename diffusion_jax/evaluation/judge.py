"""Reads colour, shape, size and position off images of the generated shapes set, analytically.

The judge measures how well generated samples agree with their captions without a learned
classifier. Per image:

1. Background: the median colour of the border pixels (shapes never reach the corners).
2. Colour: the direction of `pixel - background` summed over the image with weights
   `|pixel - background|**2`. A pixel that mixes object and background points the same way as the
   object, so the estimate depends on neither coverage, blur nor brightness; the nearest (by angle)
   of the directions to the `COLOUR_RGB` colours names the colour.
3. Soft mask: the projection of `pixel - background` onto that direction. It is not clipped, so
   pixel noise stays zero-mean, and all sums below run over a disc around the object that keeps
   distant noise out.
4. Shape: disc, square and triangle templates are placed at the mask's centroid (the centre of the
   circumscribed circle for a regular polygon), turned to the phase of the mask's third (triangle)
   or fourth (square) angular harmonic, and scaled over a few radii and edge widths (sharp or
   blurred). The template with the least squared error against the mask, at its best gain, names
   the shape. Templates are exact area coverages up to a linear edge ramp, computed for the whole
   batch at once.
5. Size and position: the fitted circumscribed radius against `SIZE_SPLIT`, and the 3x3 grid cell
   of the centroid, as in `ShapesSource.attributes`.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.data.shapes import _CIRCLE_SCALE, COLOUR_RGB, COLOURS, SHAPES, SIZE_SPLIT

# Template kinds as (shape, orientation branch). The phase of the k-th harmonic fixes a polygon's
# orientation up to its k-fold symmetry and a half-period flip (the sign of the harmonic depends on
# the shape's extent), so both branches are fitted.
_CANDIDATES = (("circle", 0), ("square", 0), ("square", 1), ("triangle", 0), ("triangle", 1))
_SIDES = {"square": 4, "triangle": 3}
# The data set's rasteriser fills every supersample that an edge touches, so its shapes come out
# grown outwards by about this many pixels (excess area over perimeter, measured at 16 and 32).
_GROWTH = {"circle": 0.12, "square": 0.08, "triangle": 0.08}
# Radii tried around the one implied by the mask's area (the gain, hence the area, is only
# estimated); the best is refined by a parabola through its neighbours.
_RADIUS_FACTORS = np.linspace(0.88, 1.12, 7)
# Edge ramp widths in pixels: 1 matches the data set; wider ones match blurred images, for which a
# sharp template would trade gain against size.
_RAMPS = (1.0, 2.0, 3.0)
# The sums run over a disc of this many circumscribed triangle radii (the largest shape of a given
# area) plus a margin in pixels; the harmonics over the ring between the polygons' inner radii and
# their corners, where the shapes differ.
_WINDOW, _WINDOW_MARGIN = 1.2, 1.5
_RING_INNER, _RING_OUTER = 0.45, 1.15
# Each pass re-centres the disc on the object; the second one matters in strong noise.
_WINDOW_PASSES = 2
# A shape is named only when its best template explains the mask: the residual (squared error
# over |mask|^2 at the best gain) stays at most this. Real images fit their own template to at most
# 0.025 at 16x16 and 0.011 at 32x32 (1,200 of the test split; 0.049 with pixel noise of std 10),
# while a real triangle fits the square or disc template no better than 0.136. Shapes between
# kinds, such as a three-armed star (0.15 to 0.4), are "unclear".
MAX_RESIDUAL = 0.1
UNCLEAR = "unclear"
# Images judged per pass: bounds the memory of the [chunk, S, S] temporaries.
_CHUNK = 512


# Eight colour-shape prompts (every colour twice, every shape at least twice) on which the
# benchmarks measure how well a model follows a prompt.
COLOUR_SHAPE_PROMPTS = (
  "a red circle",
  "a green square",
  "a blue triangle",
  "a yellow circle",
  "a red square",
  "a green circle",
  "a blue circle",
  "a yellow triangle",
)


def _area_per_radius2(shape: str) -> float:
  """Area of a shape over its circumscribed radius squared (discs shrunk as in the data set)."""
  if shape == "circle":
    return np.pi * _CIRCLE_SCALE**2
  n = _SIDES[shape]
  return 0.5 * n * np.sin(2 * np.pi / n)


def _background(images: np.ndarray) -> np.ndarray:
  """Median border colour: [N, S, S, 3] -> [N, 3]."""
  border = np.concatenate(
    [images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
  )
  return np.median(border, axis=1)


def _edge_distances(shape: str, dx: np.ndarray, dy: np.ndarray, angle: np.ndarray) -> list:
  """Signed distances that a template's edges are compared against.

  Args:
    shape: a name from SHAPES.
    dx, dy: float32 [N, S, S] pixel-centre offsets from each template's centre (pixels, y down).
    angle: [N] angle of a polygon's first vertex (radians, clockwise on screen).

  Returns:
    A list of float32 [N, S, S]: the distance from the centre for a disc; for a polygon, the
    projections onto each edge's outward normal. A pixel centre is inside when all are below the
    template's level (radius or apothem).
  """
  if shape == "circle":
    return [np.sqrt(dx * dx + dy * dy)]
  n = _SIDES[shape]
  normals = angle[:, None] + 2 * np.pi * (np.arange(n) + 0.5) / n
  cos, sin = np.cos(normals).astype(np.float32), np.sin(normals).astype(np.float32)
  return [cos[:, k, None, None] * dx + sin[:, k, None, None] * dy for k in range(n)]


def _coverage(distances: list, level: np.ndarray, ramp: float) -> np.ndarray:
  """Template coverage in [0, 1]: [N, S, S], edges ramped linearly over `ramp` pixels."""
  level = level.astype(np.float32)[:, None, None]
  cover = None
  for d in distances:
    c = np.clip(0.5 + (level - d) / ramp, 0.0, 1.0)
    cover = c if cover is None else cover * c
  return cover


def _level(shape: str, radius: np.ndarray) -> np.ndarray:
  """Edge level of `_edge_distances` for circumscribed radius [N] (pixels, rasteriser growth)."""
  if shape == "circle":
    return radius * _CIRCLE_SCALE + _GROWTH[shape]
  return radius * np.cos(np.pi / _SIDES[shape]) + _GROWTH[shape]


def _fit_radius(errs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least error [N] and its radius factor [N] from errors [N, F] over `_RADIUS_FACTORS`."""
  rows = np.arange(len(errs))
  best = np.argmin(errs, axis=1)
  j = np.clip(best, 1, len(_RADIUS_FACTORS) - 2)
  e0, e1, e2 = errs[rows, j - 1], errs[rows, j], errs[rows, j + 1]
  curve = e0 - 2 * e1 + e2
  shift = np.where(curve > 0, 0.5 * (e0 - e2) / np.maximum(curve, 1e-12), 0.0)
  step = _RADIUS_FACTORS[1] - _RADIUS_FACTORS[0]
  return errs[rows, best], _RADIUS_FACTORS[j] + np.clip(shift, -1.0, 1.0) * step


def _analyse(images: np.ndarray) -> dict[str, np.ndarray]:
  """Fits one batch: float32 [N, S, S, 3] -> colour and shape indices, size, centre."""
  n, s = images.shape[:2]
  background = _background(images)
  diff = images - background[:, None, None]
  weight = np.sum(diff * diff, axis=-1, keepdims=True)
  direction = np.sum(weight * diff, axis=(1, 2))
  direction /= np.maximum(np.linalg.norm(direction, axis=-1, keepdims=True), 1e-6)
  references = np.array([COLOUR_RGB[c] for c in COLOURS], np.float32)[None] - background[:, None]
  references /= np.maximum(np.linalg.norm(references, axis=-1, keepdims=True), 1e-6)
  colour = np.argmax(np.einsum("nc,nkc->nk", direction, references), axis=1)

  proj = np.einsum("nhwc,nc->nhw", diff, direction)
  # A rough gain (the brightest pixels) puts the mask near [0, 1]; the fit corrects its scale.
  gain = np.maximum(np.mean(np.sort(proj.reshape(n, -1), axis=1)[:, -3:], axis=1), 1.0)
  mask = proj / gain[:, None, None]

  coords = np.arange(s, dtype=np.float32) + 0.5
  x, y = coords[None, None, :], coords[None, :, None]

  def centroid(m):
    area = np.maximum(m.sum(axis=(1, 2)), 1e-3)
    return area, np.sum(m * x, axis=(1, 2)) / area, np.sum(m * y, axis=(1, 2)) / area

  # First from the clipped mask over the whole image, then unclipped inside a disc around it.
  area, cx, cy = centroid(np.clip(mask, 0.0, 1.0))
  full = mask
  for _ in range(_WINDOW_PASSES):
    reach = _WINDOW * np.sqrt(area / _area_per_radius2("triangle")) + _WINDOW_MARGIN
    d2 = (x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2
    mask = np.where(d2 <= reach[:, None, None] ** 2, full, 0.0)
    area, cx, cy = centroid(mask)
  dx, dy = x - cx[:, None, None], y - cy[:, None, None]
  r = np.sqrt(dx * dx + dy * dy)
  reach = np.sqrt(area / _area_per_radius2("triangle"))[:, None, None]
  ring = (r >= _RING_INNER * reach) & (r <= _RING_OUTER * reach + 1.0)
  unit = (dx + 1j * dy) / np.maximum(r, 1e-6)
  phase = {k: np.angle(np.sum(np.where(ring, mask, 0.0) * unit**k, axis=(1, 2))) for k in (3, 4)}

  errors = np.full((len(_CANDIDATES), n), np.inf)
  radii = np.zeros((len(_CANDIDATES), n))
  for c, (shape, branch) in enumerate(_CANDIDATES):
    base = np.sqrt(area / _area_per_radius2(shape))
    angle = np.zeros(n) if shape == "circle" else (phase[_SIDES[shape]] + branch * np.pi)
    angle = angle / _SIDES.get(shape, 1)
    distances = _edge_distances(shape, dx, dy, angle)
    for ramp in _RAMPS:
      errs = np.empty((n, len(_RADIUS_FACTORS)))
      for f, factor in enumerate(_RADIUS_FACTORS):
        t = _coverage(distances, _level(shape, factor * base), ramp)
        tt = np.maximum(np.sum(t * t, axis=(1, 2)), 1e-6)
        # Squared error at the best gain, less the constant |mask|^2.
        errs[:, f] = -(np.sum(mask * t, axis=(1, 2)) ** 2) / tt
      err, factor = _fit_radius(errs)
      better = err < errors[c]
      errors[c] = np.where(better, err, errors[c])
      radii[c] = np.where(better, factor * base, radii[c])
  pick = np.argmin(errors, axis=0)
  # errors hold the squared error less |mask|^2: relative to |mask|^2 this is 1 - cos^2 of the
  # angle between the mask and the best template.
  norm = np.maximum(np.sum(mask * mask, axis=(1, 2)), 1e-6)
  residual = 1.0 + errors[pick, np.arange(n)] / norm
  return {
    "residual": residual,
    "colour": colour,
    "shape": np.array([SHAPES.index(_CANDIDATES[c][0]) for c in pick], np.int64),
    "size": 2 * radii[pick, np.arange(n)] / s,
    "cx": cx / s,
    "cy": cy / s,
  }


def measure(images) -> dict[str, np.ndarray]:
  """Fits every image's shape and reads its attributes as numbers.

  Args:
    images: uint8 [N, S, S, 3] (or one [S, S, 3]) in [0, 255], square, one shape on a dark
      background as rendered by `ShapesSource`.

  Returns:
    {"colour": int [N] index into COLOURS, "shape": int [N] index into SHAPES (of the best
    template), "residual": float [N] how badly that template fits (see MAX_RESIDUAL), "size":
    float [N] circumscribed diameter over the side (the data set's `size`), "cx", "cy": float
    [N] centre in fractions of the side (y down)}.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"expected [N, S, S, 3] or [S, S, 3] images, got shape {images.shape}")
  parts = [
    _analyse(images[i : i + _CHUNK].astype(np.float32)) for i in range(0, len(images), _CHUNK)
  ]
  if not parts:
    return {k: np.zeros(0) for k in ("residual", "colour", "shape", "size", "cx", "cy")}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cell(cx: float, cy: float) -> str:
  """The 3x3 grid cell of a point, named as `ShapesSource.attributes` names positions."""
  row = ("top", "", "bottom")[min(max(int(cy * 3), 0), 2)]
  col = ("left", "", "right")[min(max(int(cx * 3), 0), 2)]
  return " ".join(part for part in (row, col) if part) or "centre"


def judge(images) -> dict[str, list[str]]:
  """Reads the attributes of shapes images in words.

  Args:
    images: uint8 [N, S, S, 3] (or one [S, S, 3]) in [0, 255], square, one shape on a dark
      background as rendered by `ShapesSource`.

  Returns:
    {"colour": [...], "shape": [...], "size": [...], "position": [...]}, N strings each: a name
    from COLOURS, one from SHAPES or "unclear" (no template fits: residual > MAX_RESIDUAL),
    "small" or "large", and a 3x3 grid cell ("top left", "top", ..., "centre", ...,
    "bottom right"), as in `ShapesSource.attributes`.
  """
  m = measure(images)
  return {
    "colour": [COLOURS[i] for i in m["colour"]],
    "shape": [
      SHAPES[i] if r <= MAX_RESIDUAL else UNCLEAR
      for i, r in zip(m["shape"], m["residual"], strict=True)
    ],
    "size": ["small" if v < SIZE_SPLIT else "large" for v in m["size"]],
    "position": [_cell(x, y) for x, y in zip(m["cx"], m["cy"], strict=True)],
  }


def agreement(images, colour: str | None, shape: str | None) -> dict[str, float]:
  """Fractions of images whose judged colour and shape equal the requested ones.

  Args:
    images: uint8 [N, S, S, 3] (or one [S, S, 3]) in [0, 255], N > 0.
    colour: a name from COLOURS, or None to skip the colour.
    shape: a name from SHAPES, or None to skip the shape.

  Returns:
    {"colour": f, "shape": f, "both": f} with f in [0, 1]: a key for each attribute given, and
    "both" (colour and shape right on the same image) when both are given.
  """
  if colour is not None and colour not in COLOURS:
    raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
  if shape is not None and shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
  judged = judge(images)
  if not judged["colour"]:
    raise ValueError("agreement needs at least one image")
  hits = {}
  if colour is not None:
    hits["colour"] = np.array([c == colour for c in judged["colour"]])
  if shape is not None:
    hits["shape"] = np.array([s == shape for s in judged["shape"]])
  if len(hits) == 2:
    hits["both"] = hits["colour"] & hits["shape"]
  return {k: float(np.mean(v)) for k, v in hits.items()}
