"""Built-in video with depth under controlled lighting: ray-cast scenes of spheres on a textured ground.

PreludeNet (Ziskind, Kim, Burachas 2022) is evaluated on "a new synthetic dataset, in which lighting conditions
(such as overall illumination, and effect of shadows) can be parametrically adjusted while keeping all other aspects
of the world constant". That dataset is not public, so this module renders one of the same kind: a camera drives
forward over a checkered ground on which coloured spheres roll; a sun (directional light) with an ambient term shades
them (Lambertian), and shadow rays cast hard shadows. A scene (geometry, motion, colours) is drawn from its own seed
(split, index); a lighting is four numbers (illumination, sun elevation, sun azimuth, shadow strength) that change
every pixel's colour but no depth. The same scene can thus be rendered under any number of lightings, which is what
the invariance evaluation needs.

Depth is the camera-space z distance (world units), clipped to FAR; the sky and ground farther than FAR have no
depth target (`valid` 0). World: y up, the ground is y = 0, the camera looks along +z, pitched down, and moves
along +z. The built-in lightings keep the sun ahead of the camera or beside it (azimuth within +-90 degrees), so
shadows fall toward the camera or sideways, where they are seen; the ground casts none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SPLIT_SIZES = {'train': 2000, 'val': 64}
SPLIT_SALT = {'train': 0, 'val': 1}
FAR = 20.0  # depth is clipped here; the config's input.depth_scale divides it for the targets
FOV_DEGREES = 60.0
AMBIENT = 0.3  # the share of light that is not the sun's (it is scaled by the illumination, not shadowed)
SKY = np.array([0.55, 0.7, 0.9])


@dataclasses.dataclass(frozen=True)
class Lighting:
    """One lighting of a scene: `illumination` scales all light; the sun stands `elevation` degrees above the
    horizon at `azimuth` degrees from the camera's forward direction (positive: to the right); `shadows` in [0, 1]
    is the share of sunlight an occluded point loses (0: no shadows, 1: hard black-sun shadows)."""

    illumination: float = 1.0
    elevation: float = 50.0
    azimuth: float = 30.0
    shadows: float = 1.0

    def sun(self) -> np.ndarray:
        """The unit vector toward the sun."""
        el, az = math.radians(self.elevation), math.radians(self.azimuth)
        return np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


# The evaluation's lightings of every scene: the reference, dimmed, without shadows, and a low sun from the other side
# (long shadows). Each differs from the reference in what the paper varies: overall illumination or shadows.
EVAL_LIGHTINGS = (
    Lighting(1.0, 50.0, 30.0, 1.0),
    Lighting(0.5, 50.0, 30.0, 1.0),
    Lighting(1.0, 50.0, 30.0, 0.0),
    Lighting(0.8, 25.0, -60.0, 1.0),
)


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """A training lighting: illumination U(0.4, 1), sun elevation U(20, 70), azimuth U(-90, 90), and shadows off
    for a quarter of the clips, of strength U(0.5, 1) otherwise."""
    shadows = 0.0 if rng.random() < 0.25 else float(rng.uniform(0.5, 1.0))
    return Lighting(
        float(rng.uniform(0.4, 1.0)), float(rng.uniform(20.0, 70.0)), float(rng.uniform(-90.0, 90.0)), shadows
    )


@dataclasses.dataclass(frozen=True)
class Scene:
    """Geometry, motion and colours of one scene. Spheres rest on the ground (centre height = radius) and move at
    constant velocity in x and z (world units per frame); the camera moves `camera_speed` along z per frame."""

    camera_height: float
    camera_pitch: float  # degrees below the horizon
    camera_x: float
    camera_speed: float
    centres: np.ndarray  # (N, 2) x, z at frame 0
    velocities: np.ndarray  # (N, 2)
    radii: np.ndarray  # (N,)
    albedos: np.ndarray  # (N, 3)
    ground: np.ndarray  # (2, 3) the checker's two colours
    tile: float  # checker tile size (world units)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene: 2-5 spheres of radius 0.4-1.1 between 4 and 10 units ahead, moving up to 0.4 units a frame sideways
    and -0.08 to 0.25 in depth; the camera 1.2-2 units high, pitched 10-25 degrees down, driving at 0-0.1 units a
    frame. The camera closes on a sphere by at most 0.18 a frame, so within 16 frames it never reaches one. Spheres
    may pass through each other."""
    n = int(rng.integers(2, 6))
    velocities = np.stack([rng.uniform(-0.4, 0.4, n), rng.uniform(-0.08, 0.25, n)], axis=1)
    return Scene(
        camera_height=float(rng.uniform(1.2, 2.0)),
        camera_pitch=float(rng.uniform(10.0, 25.0)),
        camera_x=float(rng.uniform(-0.5, 0.5)),
        camera_speed=float(rng.uniform(0.0, 0.1)),
        centres=np.stack([rng.uniform(-2.5, 2.5, n), rng.uniform(4.0, 10.0, n)], axis=1),
        velocities=velocities,
        radii=rng.uniform(0.4, 1.1, n),
        albedos=rng.uniform(0.15, 0.95, (n, 3)),
        ground=rng.uniform(0.2, 0.8, (2, 3)),
        tile=float(rng.uniform(0.5, 1.5)),
    )


def scene_seed(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator scene `index` of `split` is drawn from: a split is a fixed set of scenes and needs no storage."""
    return np.random.default_rng([seed, SPLIT_SALT[split], index])


def camera_rays(size: int, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """(unit ray directions (size * size, 3) in world axes, the camera's forward axis (3,)) for a pinhole camera
    pitched `pitch` degrees down; pixel (0, 0) is the top left."""
    focal = 0.5 / math.tan(math.radians(FOV_DEGREES) / 2)
    coords = (np.arange(size) + 0.5) / size - 0.5
    v, u = np.meshgrid(-coords, coords, indexing='ij')  # image up, right
    p = math.radians(pitch)
    forward = np.array([0.0, -math.sin(p), math.cos(p)])
    up = np.array([0.0, math.cos(p), math.sin(p)])
    right = np.array([1.0, 0.0, 0.0])
    d = focal * forward + u[..., None] * right + v[..., None] * up
    d = d.reshape(-1, 3)
    return d / np.linalg.norm(d, axis=1, keepdims=True), forward


def _hit_spheres(origins: np.ndarray, dirs: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> tuple:
    """(nearest positive ray distance (P,), index of the sphere hit (P,)) with inf / -1 where no sphere is hit.
    origins (P, 3) or (3,), dirs (P, 3) unit, centres (N, 3)."""
    oc = origins[..., None, :] - centres  # (P, N, 3)
    b = np.einsum('pk,pnk->pn', dirs, oc) if oc.ndim == 3 else dirs @ oc.T
    c = np.sum(oc * oc, axis=-1) - radii**2
    disc = b * b - c
    root = np.sqrt(np.maximum(disc, 0.0))
    near, far = -b - root, -b + root
    t = np.where(near > 1e-4, near, far)  # from inside a sphere (shadow rays leave the surface): its far side
    t = np.where((disc >= 0) & (t > 1e-4), t, np.inf)
    which = np.argmin(t, axis=-1)
    best = np.take_along_axis(t, which[:, None], axis=-1)[:, 0]
    return best, np.where(np.isfinite(best), which, -1)


def render(scene: Scene, lighting: Lighting, frames: int, size: int) -> dict[str, np.ndarray]:
    """{'frames': float32 (T, S, S, 3) in [0, 1], 'depth': float32 (T, S, S) camera-z distance clipped to FAR,
    'valid': bool (T, S, S), False on the sky and beyond FAR}. Depth and valid depend on the scene only, never on
    the lighting."""
    dirs, forward = camera_rays(size, scene.camera_pitch)
    sun = lighting.sun()
    out_frames = np.empty((frames, size * size, 3))
    out_depth = np.empty((frames, size * size))
    out_valid = np.empty((frames, size * size), bool)
    for t in range(frames):
        origin = np.array([scene.camera_x, scene.camera_height, scene.camera_speed * t])
        xz = scene.centres + scene.velocities * t
        centres = np.stack([xz[:, 0], scene.radii, xz[:, 1]], axis=1)
        t_sphere, which = _hit_spheres(origin, dirs, centres, scene.radii)
        t_ground = np.where(dirs[:, 1] < -1e-6, -origin[1] / np.minimum(dirs[:, 1], -1e-6), np.inf)
        dist = np.minimum(t_sphere, t_ground)
        on_sphere = t_sphere < t_ground
        hit = origin + np.where(np.isfinite(dist), dist, 0.0)[:, None] * dirs
        # Surface normals and albedo: the sphere's, or the ground's (up; checker colour by tile parity).
        normal = np.where(
            on_sphere[:, None], (hit - centres[np.maximum(which, 0)]) / scene.radii[np.maximum(which, 0), None], 0.0
        )
        normal[~on_sphere] = (0.0, 1.0, 0.0)
        parity = (np.floor(hit[:, 0] / scene.tile) + np.floor(hit[:, 2] / scene.tile)).astype(int) % 2
        albedo = np.where(on_sphere[:, None], scene.albedos[np.maximum(which, 0)], scene.ground[parity])
        # Shadow rays toward the sun from just above the surface.
        shadow_t, _ = _hit_spheres(hit + 1e-3 * normal, np.broadcast_to(sun, hit.shape), centres, scene.radii)
        lit = np.maximum(normal @ sun, 0.0) * (1.0 - lighting.shadows * np.isfinite(shadow_t))
        colour = lighting.illumination * albedo * (AMBIENT + (1.0 - AMBIENT) * lit[:, None])
        # Ground beyond FAR is drawn but has no depth target; rays that hit nothing see the sky.
        valid = np.isfinite(dist) & (dist * (dirs @ forward) < FAR)
        colour = np.where(np.isfinite(dist)[:, None], colour, lighting.illumination * SKY)
        out_frames[t] = colour
        out_depth[t] = np.where(valid, dist * (dirs @ forward), FAR)
        out_valid[t] = valid
    shape = (frames, size, size)
    return {
        'frames': np.clip(out_frames, 0.0, 1.0).reshape(*shape, 3).astype(np.float32),
        'depth': out_depth.reshape(shape).astype(np.float32),
        'valid': out_valid.reshape(shape),
    }


class LitSceneSource:
    """The built-in scenes of one split, as records {'name', 'scene': Scene} (scene k drawn from scene_seed)."""

    label_keys: tuple[str, ...] = ()

    def __init__(self, split: str, size: int | None = None, seed: int = 0):
        if split not in SPLIT_SIZES:
            raise ValueError(f'unknown split {split!r} of the built-in lit scenes: {sorted(SPLIT_SIZES)}')
        self.split, self.seed = split, seed
        self.size = SPLIT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            'name': f'lit_scenes/{self.split}/{index}',
            'scene': sample_scene(scene_seed(self.split, index, self.seed)),
        }

    def __repr__(self) -> str:
        return f'LitSceneSource({self.split!r}, {len(self)} scenes)'
