"""Tests for diffusion_jax.core.rendering and scene: cameras, Beer-Lambert, compositing, shading."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator

from diffusion_jax.core import rendering, scene

BACKGROUND = np.array([0.9, 0.8, 0.7], np.float32)
COLOR = np.array([0.2, 0.6, 0.9], np.float32)


def _slab(sigma: float, half_width: float):
  """σ inside the slab |x| <= half_width (perpendicular to the x axis), colour COLOR."""

  def field_fn(points):
    inside = jnp.abs(points[..., 0]) <= half_width
    albedo = jnp.broadcast_to(jnp.asarray(COLOR), points.shape)
    return jnp.where(inside, sigma, 0.0), albedo

  return field_fn


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_samples", "size", "shading"))
def _view(field_fn, azimuth, elevation, key=None, *, num_samples=400, size=5, shading="albedo"):
  return rendering.render_view(
    field_fn,
    azimuth,
    elevation,
    2.0,
    height=size,
    width=size,
    fov_deg=40.0,
    near=0.0,
    far=4.0,
    num_samples=num_samples,
    key=key,
    background=BACKGROUND,
    shading=shading,
    light_dir=jnp.array([1.0, 0.0, 0.0]),
  )


def test_the_camera_at_azimuth_0_elevation_0_looks_at_the_origin():
  c2w = rendering.camera_to_world(0.0, 0.0, 2.0)
  np.testing.assert_allclose(c2w[:3, 3], [2.0, 0.0, 0.0], atol=1e-6)
  origins, directions = rendering.pinhole_rays(c2w, 5, 5, 40.0)
  np.testing.assert_allclose(directions[2, 2], [-1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(origins[2, 2], [2.0, 0.0, 0.0], atol=1e-6)
  # Up in the image is +z in the world; right is +y (looking west, north is on the right).
  assert directions[0, 2, 2] > 0 and directions[2, 4, 1] > 0
  assert abs(directions[0, 2, 1]) < 1e-6 and abs(directions[2, 4, 2]) < 1e-6


@pytest.mark.parametrize("azimuth,elevation", [(0.0, 0.0), (73.0, 25.0), (-140.0, -60.0)])
def test_cameras_are_rigid_and_aim_their_central_ray_at_the_origin(azimuth, elevation):
  c2w = np.asarray(rendering.camera_to_world(azimuth, elevation, 3.0), np.float64)
  rotation = c2w[:3, :3]
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-6)
  phi, theta = np.deg2rad(azimuth), np.deg2rad(elevation)
  position = 3.0 * np.array(
    [np.cos(theta) * np.cos(phi), np.cos(theta) * np.sin(phi), np.sin(theta)]
  )
  np.testing.assert_allclose(c2w[:3, 3], position, atol=1e-5)
  assert abs(rotation[2, 0]) < 1e-6  # the right vector is horizontal
  _, directions = rendering.pinhole_rays(jnp.asarray(c2w, jnp.float32), 7, 7, 50.0)
  np.testing.assert_allclose(directions[3, 3], -position / 3.0, atol=1e-6)
  # The pixel rows' centres span the vertical field of view less half a pixel at each end.
  focal = 3.5 / np.tan(np.deg2rad(25.0))
  angle = np.arccos(np.dot(directions[0, 3], directions[3, 3]))
  np.testing.assert_allclose(angle, np.arctan(3.0 / focal), atol=1e-5)


def test_an_empty_scene_renders_exactly_the_background():
  empty = lambda points: (jnp.zeros(points.shape[:-1]), jnp.full(points.shape, 0.5))
  out = _view(empty, 30.0, 10.0)
  np.testing.assert_array_equal(out["rgb"], np.broadcast_to(BACKGROUND, (5, 5, 3)))
  np.testing.assert_array_equal(out["opacity"], np.zeros((5, 5)))
  np.testing.assert_array_equal(out["depth"], np.zeros((5, 5)))
  grid = scene.init_voxel_grid(jax.random.key(0), 4, density=-1e4)
  out = _view(scene.voxel_field(grid), 30.0, 10.0)
  np.testing.assert_array_equal(out["rgb"], np.broadcast_to(BACKGROUND, (5, 5, 3)))
  np.testing.assert_array_equal(out["opacity"], np.zeros((5, 5)))


@pytest.mark.parametrize("stratified", [False, True])
def test_a_uniform_slab_follows_beer_lambert(stratified):
  """σ = 1.5 over |x| <= 0.5: the central ray crosses d = 1 between s = 1.5 and 2.5, which are
  bin edges (δ = 0.01), so the quadrature is exact even with stratified samples."""
  sigma, d = 1.5, 1.0
  key = jax.random.key(1) if stratified else None
  out = _view(_slab(sigma, 0.5), 0.0, 0.0, key)
  transmittance = np.exp(-sigma * d)
  np.testing.assert_allclose(out["transmittance"][2, 2], transmittance, rtol=1e-5)
  np.testing.assert_allclose(out["opacity"][2, 2], 1 - transmittance, rtol=1e-5)
  expected = (1 - transmittance) * COLOR + transmittance * BACKGROUND
  np.testing.assert_allclose(out["rgb"][2, 2], expected, rtol=1e-5)
  # ∫ s σ e^{-σ(s - a)} ds over [a, b] = a - b e^{-σd} + (1 - e^{-σd}) / σ.
  a, b = 1.5, 2.5
  depth = a - b * transmittance + (1 - transmittance) / sigma
  np.testing.assert_allclose(out["depth"][2, 2], depth, rtol=1e-3 if stratified else 1e-4)
  np.testing.assert_allclose(np.sum(out["weights"], axis=-1), out["opacity"], rtol=1e-6)


def test_slanted_rays_cross_the_slab_over_a_longer_path():
  """Every pixel: T = exp(-σ d / |d_x|) up to the quadrature error of bins cut by the slab."""
  sigma = 1.5
  out = _view(_slab(sigma, 0.5), 0.0, 20.0, num_samples=2000, size=7)
  c2w = rendering.camera_to_world(0.0, 20.0, 2.0)
  _, directions = rendering.pinhole_rays(c2w, 7, 7, 40.0)
  expected = np.exp(-sigma * 1.0 / np.abs(np.asarray(directions)[..., 0]))
  np.testing.assert_allclose(out["transmittance"], expected, atol=2 * sigma * 2e-3)


def _composite_reference(sigmas, colors, delta, distances, background):
  """NumPy, one ray at a time, with the product form of the transmittance."""
  rgb, opacity, depth = [], [], []
  for s, c, z in zip(sigmas, colors, distances, strict=True):
    t, acc_rgb, acc, acc_depth = 1.0, np.zeros(3), 0.0, 0.0
    for i in range(len(s)):
      alpha = 1.0 - np.exp(-s[i] * delta)
      w = t * alpha
      acc_rgb, acc, acc_depth = acc_rgb + w * c[i], acc + w, acc_depth + w * z[i]
      t *= 1.0 - alpha
    rgb.append(acc_rgb + t * background)
    opacity.append(acc)
    depth.append(acc_depth)
  return np.array(rgb), np.array(opacity), np.array(depth)


def test_composite_matches_a_numpy_reference():
  rng = np.random.default_rng(2)
  sigmas = rng.exponential(2.0, (6, 16)).astype(np.float32)
  sigmas[0] = 0.0
  colors = rng.uniform(size=(6, 16, 3)).astype(np.float32)
  distances = np.sort(rng.uniform(1.0, 3.0, (6, 16)), axis=-1).astype(np.float32)
  out = rendering.composite(sigmas, colors, 0.125, distances, BACKGROUND)
  rgb, opacity, depth = _composite_reference(
    sigmas.astype(np.float64), colors, 0.125, distances, BACKGROUND
  )
  np.testing.assert_allclose(out["rgb"], rgb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["opacity"], opacity, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["depth"], depth, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(out["weights"], -1), out["opacity"], rtol=1e-6)
  np.testing.assert_allclose(out["transmittance"], 1 - opacity, rtol=1e-5, atol=1e-6)


def test_trilinear_matches_scipy_and_the_vertices():
  rng = np.random.default_rng(3)
  values = rng.normal(size=(5, 5, 5, 2)).astype(np.float32)
  axis = np.linspace(-1.5, 1.5, 5)
  points = rng.uniform(-1.5, 1.5, (50, 3)).astype(np.float32)
  got = scene.trilinear(jnp.asarray(values), jnp.asarray(points), 1.5)
  reference = RegularGridInterpolator((axis, axis, axis), values.astype(np.float64))(points)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  vertex = np.array([[axis[1], axis[4], axis[0]]], np.float32)
  np.testing.assert_allclose(
    scene.trilinear(values[..., 0], vertex, 1.5), values[1, 4, 0, :1], 1e-6
  )
  outside = np.array([[9.0, 0.0, -9.0]], np.float32)  # clamped onto the face's edge
  np.testing.assert_allclose(scene.trilinear(values, outside, 1.5), values[4:, 2, 0], rtol=1e-6)


def test_total_variation_of_a_ramp_and_a_constant():
  ramp = jnp.broadcast_to(0.5 * jnp.arange(4.0)[:, None, None], (4, 4, 4))
  np.testing.assert_allclose(scene.total_variation(ramp), 0.25, rtol=1e-6)
  assert float(scene.total_variation(jnp.full((4, 4, 4, 3), 2.0))) == 0.0


def test_a_voxel_grid_of_uniform_density_is_a_cube_of_fog():
  """softplus(raw) = σ on [-1, 1]³ and 0 outside: the central ray crosses 2 units."""
  sigma = 0.7
  grid = scene.init_voxel_grid(jax.random.key(4), 4, density=float(np.log(np.expm1(sigma))))
  out = jax.jit(
    lambda g: rendering.render_view(
      scene.voxel_field(g),
      0.0,
      0.0,
      3.0,
      height=3,
      width=3,
      fov_deg=30.0,
      near=1.0,
      far=5.0,
      num_samples=400,
    )
  )(grid)
  np.testing.assert_allclose(out["transmittance"][1, 1], np.exp(-2 * sigma), rtol=1e-5)


def _ball(points):
  """A smooth ball of radius 0.5 (σ up to 200), albedo COLOR."""
  radius = jnp.linalg.norm(points, axis=-1)
  return 200.0 * jax.nn.sigmoid(20.0 * (0.5 - radius)), jnp.broadcast_to(COLOR, points.shape)


def test_normals_of_a_ball_point_outwards_and_shade_lambertian():
  rng = np.random.default_rng(5)
  points = rng.normal(size=(20, 3)).astype(np.float32)
  points = 0.5 * points / np.linalg.norm(points, axis=-1, keepdims=True)
  normals = rendering.density_normals(_ball, jnp.asarray(points), 1e-3)
  np.testing.assert_allclose(normals, points / 0.5, atol=1e-3)
  light = np.array([0.0, 0.0, 1.0], np.float32)
  factor = rendering.lambertian(normals, light, 0.1)
  np.testing.assert_allclose(factor, 0.1 + 0.9 * np.maximum(points[:, 2] / 0.5, 0), atol=1e-3)
  # Lit from the camera (+x), the ball's centre is lit head-on; from behind, only ambient.
  lit = _view(_ball, 0.0, 0.0, shading="lambertian", num_samples=200)
  unlit = _view(_ball, 180.0, 0.0, shading="lambertian", num_samples=200)
  np.testing.assert_allclose(lit["opacity"][2, 2], 1.0, atol=1e-5)
  np.testing.assert_allclose(lit["rgb"][2, 2], COLOR, atol=0.02)
  np.testing.assert_allclose(unlit["rgb"][2, 2], 0.1 * COLOR, atol=0.01)
  plain = _view(_ball, 0.0, 0.0, shading="textureless", num_samples=200)
  np.testing.assert_allclose(plain["rgb"][2, 2], [1.0, 1.0, 1.0], atol=0.02)
  np.testing.assert_allclose(lit["normal_map"][2, 2], [1.0, 0.0, 0.0], atol=0.02)


def test_stratified_samples_are_a_pure_function_of_the_key():
  a = _view(_ball, 10.0, 20.0, jax.random.key(6), num_samples=32)
  b = _view(_ball, 10.0, 20.0, jax.random.key(6), num_samples=32)
  c = _view(_ball, 10.0, 20.0, jax.random.key(7), num_samples=32)
  assert a["rgb"].tobytes() == b["rgb"].tobytes()
  assert a["rgb"].tobytes() != c["rgb"].tobytes()
  distances, delta = rendering.ray_samples(1.0, 3.0, 4, (2,), jax.random.key(8))
  bins = np.floor((np.asarray(distances) - 1.0) / delta)
  np.testing.assert_array_equal(bins, np.broadcast_to(np.arange(4), (2, 4)))


def test_regularisers_follow_their_formulas():
  opacity = jnp.array([0.0, 0.5, 1.0, 0.25])
  np.testing.assert_allclose(
    rendering.opacity_penalty(opacity), np.mean(np.sqrt(np.square(opacity) + 0.01)), 1e-6
  )
  np.testing.assert_allclose(rendering.opacity_penalty(opacity, kind="mean"), 0.4375, 1e-6)
  np.testing.assert_allclose(rendering.entropy_penalty(jnp.array([0.5, 0.5])), 1.0, 1e-6)
  assert float(rendering.entropy_penalty(jnp.array([0.0, 1.0]))) < 1e-3
  np.testing.assert_allclose(
    rendering.entropy_penalty(jnp.array([0.25])),
    -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75)),
    1e-5,
  )
  weights = jnp.array([[0.2, 0.5]])
  directions = jnp.array([[-1.0, 0.0, 0.0]])
  facing_camera = jnp.array([[[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]]])
  assert float(rendering.orientation_penalty(weights, facing_camera, directions)) == 0.0
  np.testing.assert_allclose(
    rendering.orientation_penalty(weights, -facing_camera, directions), 0.2 + 0.5 * 0.36, 1e-6
  )
