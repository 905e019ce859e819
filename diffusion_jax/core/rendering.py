"""Differentiable volume rendering: cameras on a sphere, pinhole rays, alpha compositing, shading.

World coordinates have z up. A camera at azimuth φ, elevation θ (degrees) and distance r sits at
r (cos θ cos φ, cos θ sin φ, sin θ) and looks at the origin; its camera-to-world matrix has the
columns (right, up, back, position), OpenGL's convention (the camera looks along its -z axis).

Along a ray o + s d (‖d‖ = 1), [near, far] is cut into N bins of width δ = (far - near) / N, one
sample s_i per bin (the midpoint, or uniform within the bin given a key: stratified sampling),
and the density σ_i is taken as constant over its bin (Max 1995; NeRF, Mildenhall et al. 2020):

    α_i = 1 - exp(-σ_i δ),   T_i = Π_{j<i} (1 - α_j) = exp(-Σ_{j<i} σ_j δ),   w_i = T_i α_i,
    colour = Σ_i w_i c_i + (1 - Σ_i w_i) background,   opacity = Σ_i w_i,   depth = Σ_i w_i s_i.

A field function (`scene.FieldFn`) gives σ and the albedo at points. Shading (DreamFusion):
"albedo" (c = albedo), "lambertian" (c = albedo (ambient + (1 - ambient) max(0, n·l))) or
"textureless" (c = the Lambertian factor alone), with normals n = -∇σ / ‖∇σ‖ by central
differences. Rendered colours are in [0, 1]; a diffusion model reads 2c - 1.
"""

import jax
import jax.numpy as jnp

from diffusion_jax.core.scene import FieldFn

SHADINGS = ("albedo", "lambertian", "textureless")


def camera_to_world(azimuth_deg, elevation_deg, distance) -> jax.Array:
  """The pose of a camera on a sphere looking at the origin.

  Args:
    azimuth_deg: () float, φ in degrees, from +x towards +y.
    elevation_deg: () float, θ in degrees, strictly inside (-90, 90) (the up vector is z).
    distance: () float, r > 0.

  Returns:
    [4, 4] float32 camera-to-world matrix, columns (right, up, back, position).
  """
  phi, theta = jnp.deg2rad(azimuth_deg), jnp.deg2rad(elevation_deg)
  position = distance * jnp.stack(
    [jnp.cos(theta) * jnp.cos(phi), jnp.cos(theta) * jnp.sin(phi), jnp.sin(theta)]
  )
  forward = -position / jnp.linalg.norm(position)
  right = jnp.cross(forward, jnp.array([0.0, 0.0, 1.0]))
  right = right / jnp.linalg.norm(right)
  up = jnp.cross(right, forward)
  pose = jnp.stack([right, up, -forward, position], axis=1)
  return jnp.concatenate([pose, jnp.array([[0.0, 0.0, 0.0, 1.0]])]).astype(jnp.float32)


def pinhole_rays(
  c2w: jax.Array, height: int, width: int, fov_deg: float
) -> tuple[jax.Array, jax.Array]:
  """Rays through the pixel centres of a pinhole camera.

  The focal length is f = (H / 2) / tan(fov / 2) pixels; pixel (i, j) (row i from the top) has
  the camera-space direction ((j + ½ - W/2) / f, -(i + ½ - H/2) / f, -1).

  Args:
    c2w: [4, 4] (or [3, 4]) camera-to-world matrix.
    height: H pixels.
    width: W pixels.
    fov_deg: the vertical field of view in degrees.

  Returns:
    (origins [H, W, 3], unit directions [H, W, 3]) float32, in world coordinates.
  """
  focal = 0.5 * height / jnp.tan(0.5 * jnp.deg2rad(fov_deg))
  rows, cols = jnp.meshgrid(
    jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
  )
  camera = jnp.stack(
    [
      (cols + 0.5 - 0.5 * width) / focal,
      -(rows + 0.5 - 0.5 * height) / focal,
      -jnp.ones_like(rows),
    ],
    axis=-1,
  )
  directions = camera @ c2w[:3, :3].T
  directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
  return jnp.broadcast_to(c2w[:3, 3], directions.shape), directions


def ray_samples(
  near: float, far: float, num_samples: int, shape: tuple[int, ...], key: jax.Array | None = None
) -> tuple[jax.Array, float]:
  """Sample distances along rays: one per bin of [near, far] (module docstring).

  Args:
    near, far: the ray segment, 0 <= near < far.
    num_samples: N bins.
    shape: the rays' batch shape [...].
    key: None for the bins' midpoints (deterministic), or a PRNG key for one uniform draw per bin
      (stratified; an unbiased estimate of the continuous integral's optical depth).

  Returns:
    (s [..., N] float32 increasing, δ the bin width, a Python float).
  """
  delta = (far - near) / num_samples
  starts = near + delta * jnp.arange(num_samples, dtype=jnp.float32)
  if key is None:
    offsets = jnp.full((*shape, num_samples), 0.5, jnp.float32)
  else:
    offsets = jax.random.uniform(key, (*shape, num_samples), jnp.float32)
  return starts + delta * offsets, delta


def composite(
  sigmas: jax.Array,
  colors: jax.Array,
  delta,
  distances: jax.Array,
  background: jax.Array,
) -> dict[str, jax.Array]:
  """Alpha compositing of samples along rays, front to back (module docstring).

  Args:
    sigmas: [..., N] densities σ_i >= 0.
    colors: [..., N, 3] colours c_i.
    delta: the bin width δ (a float, or [..., N]).
    distances: [..., N] sample distances s_i.
    background: [3] or [..., 3] colour behind the scene.

  Returns:
    {"rgb": [..., 3], "opacity": [...] Σ w_i in [0, 1], "depth": [...] Σ w_i s_i (0 for an empty
    ray), "weights": [..., N] w_i, "transmittance": [...] T after the last sample (1 - opacity)}.
  """
  optical_depth = sigmas * delta
  # T_i = exp(-Σ_{j<i} σ_j δ) equals Π_{j<i} (1 - α_j) and avoids a product of many factors.
  before = jnp.cumsum(optical_depth, axis=-1) - optical_depth
  alphas = -jnp.expm1(-optical_depth)
  weights = jnp.exp(-before) * alphas
  opacity = jnp.sum(weights, axis=-1)
  rgb = jnp.sum(weights[..., None] * colors, axis=-2) + (1.0 - opacity[..., None]) * background
  return {
    "rgb": rgb,
    "opacity": opacity,
    "depth": jnp.sum(weights * distances, axis=-1),
    "weights": weights,
    "transmittance": jnp.exp(-jnp.sum(optical_depth, axis=-1)),
  }


def density_normals(field_fn: FieldFn, points: jax.Array, step: float) -> jax.Array:
  """n = -∇σ / ‖∇σ‖ by central differences of width 2·step: [..., 3] unit (0 where ∇σ = 0)."""
  eye = step * jnp.eye(3, dtype=points.dtype)
  plus, _ = field_fn(points[..., None, :] + eye)  # [..., 3]
  minus, _ = field_fn(points[..., None, :] - eye)
  gradient = (plus - minus) / (2.0 * step)
  norm = jnp.linalg.norm(gradient, axis=-1, keepdims=True)
  return -gradient / jnp.maximum(norm, 1e-12)


def lambertian(normals: jax.Array, light_dir: jax.Array, ambient: float) -> jax.Array:
  """ambient + (1 - ambient) max(0, n·l): [...] for normals [..., 3] and a unit light_dir [3]
  (pointing from the scene towards the light)."""
  return ambient + (1.0 - ambient) * jnp.maximum(jnp.sum(normals * light_dir, axis=-1), 0.0)


def render_rays(
  field_fn: FieldFn,
  origins: jax.Array,
  directions: jax.Array,
  *,
  near: float,
  far: float,
  num_samples: int,
  key: jax.Array | None = None,
  background=(1.0, 1.0, 1.0),
  shading: str = "albedo",
  light_dir: jax.Array | None = None,
  ambient: float = 0.1,
  normal_step: float = 0.02,
) -> dict[str, jax.Array]:
  """Volume-renders a field along rays (module docstring).

  Args:
    field_fn: points [..., 3] -> (σ [...], albedo [..., 3]).
    origins: [..., 3] ray origins.
    directions: [..., 3] unit ray directions.
    near, far: the rendered segment of each ray (world units).
    num_samples: N samples per ray.
    key: None for midpoints, or a PRNG key for stratified samples (`ray_samples`).
    background: [3] or [..., 3] colour in [0, 1] behind the scene.
    shading: one of SHADINGS.
    light_dir: [3] unit vector towards the light (needed unless shading is "albedo").
    ambient: the ambient part of the Lambertian factor, in [0, 1].
    normal_step: half the width of the central differences for the normals (about a voxel).

  Returns:
    `composite`'s dict, plus "normals": [..., N, 3] the samples' unit normals (for
    `orientation_penalty`) and "normal_map": [..., 3] Σ_i w_i n_i; both zeros for shading
    "albedo", which computes no normals.
  """
  if shading not in SHADINGS:
    raise ValueError(f"unknown shading {shading!r}; valid: {', '.join(SHADINGS)}")
  distances, delta = ray_samples(near, far, num_samples, origins.shape[:-1], key)
  points = origins[..., None, :] + distances[..., None] * directions[..., None, :]
  sigmas, albedo = field_fn(points)
  normals = jnp.zeros_like(points)
  if shading != "albedo":
    if light_dir is None:
      raise ValueError(f"shading {shading!r} needs a light_dir")
    normals = density_normals(field_fn, points, normal_step)
    factor = lambertian(normals, jnp.asarray(light_dir, jnp.float32), ambient)[..., None]
    albedo = factor * (albedo if shading == "lambertian" else jnp.ones_like(albedo))
  background = jnp.asarray(background, jnp.float32)
  out = composite(sigmas, albedo, delta, distances, background)
  out["normals"] = normals
  out["normal_map"] = jnp.sum(out["weights"][..., None] * normals, axis=-2)
  return out


def render_view(
  field_fn: FieldFn,
  azimuth_deg,
  elevation_deg,
  distance,
  *,
  height: int,
  width: int,
  fov_deg: float,
  **options,
) -> dict[str, jax.Array]:
  """Renders an H x W view from a camera on a sphere (`camera_to_world`, `pinhole_rays`).

  Args:
    field_fn: the scene.
    azimuth_deg, elevation_deg, distance: () the camera (jax.vmap over them for a batch of views).
    height, width: the image size in pixels.
    fov_deg: the vertical field of view in degrees.
    **options: `render_rays`'s keyword arguments (near, far, num_samples, key, background, ...).

  Returns:
    `render_rays`'s dict: "rgb" [H, W, 3] in [0, 1], "opacity" [H, W], "depth" [H, W], ...
  """
  c2w = camera_to_world(azimuth_deg, elevation_deg, distance)
  origins, directions = pinhole_rays(c2w, height, width, fov_deg)
  return render_rays(field_fn, origins, directions, **options)


def opacity_penalty(opacity: jax.Array, *, kind: str = "sqrt") -> jax.Array:
  """Penalises filled space: mean of √(opacity² + 0.01) ("sqrt", DreamFusion's) or of the
  opacity itself ("mean"). Args: opacity [...] in [0, 1]. Returns: () float32."""
  if kind == "sqrt":
    return jnp.mean(jnp.sqrt(jnp.square(opacity) + 0.01))
  if kind == "mean":
    return jnp.mean(opacity)
  raise ValueError(f"unknown opacity penalty {kind!r}; valid: sqrt, mean")


def entropy_penalty(opacity: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Mean binary entropy -a log2 a - (1 - a) log2(1 - a) of the per-ray opacity a (clipped to
  [eps, 1 - eps]): 1 bit at a = ½, 0 at a ∈ {0, 1}; pushes rays to be empty or solid.
  Args: opacity [...] in [0, 1]. Returns: () float32 in [0, 1]."""
  a = jnp.clip(opacity, eps, 1.0 - eps)
  return jnp.mean(-a * jnp.log2(a) - (1.0 - a) * jnp.log2(1.0 - a))


def orientation_penalty(weights: jax.Array, normals: jax.Array, directions: jax.Array) -> jax.Array:
  """Ref-NeRF's (used by DreamFusion) Σ_i w_i max(0, n_i·d)², normals facing away from the
  camera; mean over rays. Args: weights [..., N], normals [..., N, 3], directions [..., 3].
  Returns: () float32 >= 0."""
  facing = jnp.sum(normals * directions[..., None, :], axis=-1)
  return jnp.mean(jnp.sum(weights * jnp.square(jnp.maximum(facing, 0.0)), axis=-1))
