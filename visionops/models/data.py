"""Generated data sets for the reference models: every sample is drawn from a ``torch.Generator``, so tests and
examples need no download and repeat exactly.

Conventions: visionops/models/README.md.
"""

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def random_boxes(
    n: int, image_size: Tuple[int, int], *, min_size: float = 8.0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Tensor[n, 4] of (x1, y1, x2, y2) boxes inside an image of size (H, W), each side at least ``min_size``."""
    h, w = image_size
    if min_size <= 0 or min_size > min(h, w):
        raise ValueError(f"min_size must be in (0, min(H, W)] = (0, {min(h, w)}], got {min_size}")
    wh = min_size + torch.rand(n, 2, generator=generator) * (torch.tensor([w, h]) - min_size)
    xy = torch.rand(n, 2, generator=generator) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], 1)


def shapes_detection(
    num_images: int,
    image_size: Tuple[int, int] = (128, 128),
    *,
    max_objects: int = 4,
    num_classes: int = 3,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, List[dict]]:
    """A toy detection and instance-segmentation set: images float32 [N, 3, H, W] in 0..1 and torchvision-style
    targets, one ``{"boxes": float32 [K, 4], "labels": int64 [K], "masks": uint8 [K, H, W]}`` per image.

    Each image is a mid-grey blocky colour texture with fine noise and clutter (a few thin bars of random colour),
    under 1 to ``max_objects`` shapes of random kind (the label: 1 disc, 2 square, 3 triangle, as
    :data:`SHAPE_CLASSES`; ``num_classes`` < 3 keeps the first kinds), size (circumradius 7-22 % of the shorter
    side), rotation and saturated colour with a fine texture of their own. Shapes may overlap: a later shape is drawn
    over the earlier ones, whose ``masks`` keep only their visible pixels and whose ``boxes`` (x1, y1, x2, y2, pixel
    edges) are the tight boxes of those pixels; a shape that would hide more than half of an earlier one is not
    drawn."""
    if num_images < 0 or max_objects < 1 or not 1 <= num_classes <= 3:
        raise ValueError(
            f"need num_images >= 0, max_objects >= 1 and 1 <= num_classes <= 3, got {num_images}, {max_objects}, "
            f"{num_classes}"
        )
    h, w = image_size
    if min(h, w) < 16:
        raise ValueError(f"image_size must be at least 16x16, got {tuple(image_size)}")
    g = generator
    side = max(h, w)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    images = torch.empty(num_images, 3, h, w)
    targets = []
    for i in range(num_images):
        cells = int(torch.randint(4, 13, (1,), generator=g))
        img = 0.35 + 0.3 * _texture(side, cells, g)[:, :h, :w]
        for _ in range(int(torch.randint(2, 7, (1,), generator=g))):  # clutter: thin bars, never shape-like
            long, thin = u(0.15, 0.5) * min(h, w), u(1.0, 3.0)
            bw, bh = (long, thin) if u(0, 1) < 0.5 else (thin, long)
            x0, y0 = int(u(0, w - bw)), int(u(0, h - bh))
            colour = torch.rand(3, 1, 1, generator=g)
            img[:, y0 : y0 + max(1, round(bh)), x0 : x0 + max(1, round(bw))] = colour
        full: List[Tensor] = []
        visible: List[Tensor] = []
        labels: List[int] = []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            kind = int(torch.randint(1, num_classes + 1, (1,), generator=g))
            r = min(h, w) * u(0.07, 0.22)
            cx, cy = u(r, w - r), u(r, h - r)
            mask = _shape_mask(kind, cx, cy, r, u(0, 2 * math.pi), side)[:h, :w]
            # each channel dark or bright, never the background's mid grey
            colour = torch.where(torch.rand(3, generator=g) < 0.5, 0.0, 0.8) + 0.2 * torch.rand(3, generator=g)
            fill = colour[:, None, None] + 0.1 * (torch.rand(1, h, w, generator=g) - 0.5)
            if not mask.any() or any(int((v & ~mask).sum()) * 2 < int(f.sum()) for f, v in zip(full, visible)):
                continue
            visible = [v & ~mask for v in visible]
            full.append(mask)
            visible.append(mask)
            labels.append(kind)
            img = torch.where(mask, fill, img)
        images[i] = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        masks = torch.stack(visible)
        rows, cols = masks.any(2), masks.any(1)
        ar_h, ar_w = torch.arange(h), torch.arange(w)
        boxes = torch.stack(
            [
                torch.where(cols, ar_w, w).min(1).values,
                torch.where(rows, ar_h, h).min(1).values,
                torch.where(cols, ar_w, -1).max(1).values + 1,
                torch.where(rows, ar_h, -1).max(1).values + 1,
            ],
            1,
        ).float()
        targets.append({"boxes": boxes, "labels": torch.tensor(labels), "masks": masks.to(torch.uint8)})
    return images, targets


class TrackingClip(NamedTuple):
    """A generated tracking sequence: ``frames`` uint8 [T, 3, H, W] (RGB), the target's ``boxes`` float64 [T, 4]
    (x1, y1, x2, y2, continuous pixel coordinates) and ``centers`` [T, 2] (x, y), and the distractor's boxes [T, 4]."""

    frames: Tensor
    boxes: Tensor
    centers: Tensor
    distractor_boxes: Tensor


def _texture(size: int, cells: int, generator: Optional[torch.Generator]) -> Tensor:
    """A [3, size, size] texture in 0..1: a cells x cells grid of random colours, blurred a little."""
    grid = torch.rand(1, 3, cells, cells, generator=generator)
    tex = F.interpolate(grid, size=(size, size), mode="nearest")
    return F.avg_pool2d(F.pad(tex, (1, 1, 1, 1), mode="replicate"), 3, 1)[0]


def _paste(canvas: Tensor, sprite: Tensor, x: float, y: float) -> None:
    """Draw ``sprite`` [3, s, s] over ``canvas`` [3, H, W] with its top-left corner at the continuous point (x, y):
    bilinear at sub-pixel offsets (sprite and its coverage shifted alike), clipped at the borders."""
    s = sprite.shape[-1]
    ix, iy = math.floor(x), math.floor(y)
    fx, fy = x - ix, y - iy
    rgba = F.pad(torch.cat([sprite, torch.ones_like(sprite[:1])]), (1, 1, 1, 1))  # [4, s + 2, s + 2]
    # shift right/down by (fx, fy): out[i] = (1 - f) * in[i] + f * in[i - 1]
    rgba = (1 - fx) * rgba + fx * torch.roll(rgba, 1, 2)
    rgba = (1 - fy) * rgba + fy * torch.roll(rgba, 1, 1)
    h, w = canvas.shape[-2:]
    x0, y0 = ix - 1, iy - 1
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + s + 2, w), min(y0 + s + 2, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    patch = rgba[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    alpha = patch[3:]
    region = canvas[:, cy0:cy1, cx0:cx1]
    region.mul_(1 - alpha).add_(patch[:3])  # premultiplied: the colours were shifted with the coverage


def tracking_clip(
    frames: int = 60,
    size: int = 360,
    *,
    object_size: int = 48,
    max_speed: float = 5.0,
    clutter: int = 120,
    generator: Optional[torch.Generator] = None,
) -> TrackingClip:
    """A single-object tracking clip: a textured ``object_size`` square moving along a smooth elliptic arc at up to
    ``max_speed`` px per frame, always fully inside the frame, over a cluttered random-texture background (smooth
    colour field plus ``clutter`` random rectangles and noise); a second square of another random texture crosses
    near it (its centre passes 20-40 px from the target's, around the middle of the clip) behind it."""
    if frames < 1 or object_size < 4 or size < 4 * object_size:
        raise ValueError(f"need frames >= 1 and 4 <= object_size <= size / 4, got {frames}, {object_size}, {size}")
    g = generator

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    # background: smooth colour field, random rectangles, fine noise
    field = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    bg = field[0].clamp(0, 1) * 0.6 + 0.2
    for _ in range(clutter):
        w, h = int(u(6, 50)), int(u(6, 50))
        x, y = int(u(-w, size)), int(u(-h, size))
        colour = torch.rand(3, 1, 1, generator=g)
        bg[:, max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = colour
    bg = (bg + 0.04 * torch.randn(bg.shape, generator=g)).clamp(0, 1)

    target = _texture(object_size, 6, g)
    distractor = _texture(object_size, 6, g)

    # the target's centre: an arc of a rotated ellipse, speed <= max_speed everywhere
    margin = object_size / 2 + 4
    radius = size / 2 - margin
    a, b, phi = u(0.45, 0.75) * radius, u(0.45, 0.75) * radius, u(0, math.pi)
    ex = math.hypot(a * math.cos(phi), b * math.sin(phi))
    ey = math.hypot(a * math.sin(phi), b * math.cos(phi))
    c0 = (u(margin + ex, size - margin - ex), u(margin + ey, size - margin - ey))
    omega = max_speed * u(0.8, 1.0) / max(a, b) * (1 if u() < 0.5 else -1)
    theta = u(0, 2 * math.pi) + omega * torch.arange(frames, dtype=torch.float64)
    ex_, ey_ = a * torch.cos(theta), b * torch.sin(theta)
    centers = torch.stack(
        [c0[0] + ex_ * math.cos(phi) - ey_ * math.sin(phi), c0[1] + ex_ * math.sin(phi) + ey_ * math.cos(phi)], 1
    )

    # the distractor: relative to the target a straight line at 3-5 px per frame, closest (20-40 px between the
    # centres) at frame t_c
    t_c = int(u(0.35, 0.65) * (frames - 1))
    heading = u(0, 2 * math.pi)
    along = torch.tensor([math.cos(heading), math.sin(heading)], dtype=torch.float64)
    across = torch.tensor([-along[1], along[0]]) * (1 if u() < 0.5 else -1)
    steps = (torch.arange(frames, dtype=torch.float64) - t_c)[:, None]
    d_centers = centers + u(20, 40) * across + steps * u(3, 5) * along

    half = object_size / 2
    video = torch.empty(frames, 3, size, size, dtype=torch.uint8)
    for t in range(frames):
        canvas = bg.clone()
        _paste(canvas, distractor, float(d_centers[t, 0]) - half, float(d_centers[t, 1]) - half)
        _paste(canvas, target, float(centers[t, 0]) - half, float(centers[t, 1]) - half)
        video[t] = (canvas * 255).round().clamp(0, 255).to(torch.uint8)
    boxes = torch.cat([centers - half, centers + half], 1)
    d_boxes = torch.cat([d_centers - half, d_centers + half], 1)
    return TrackingClip(video, boxes, centers, d_boxes)


# ---- segmentation: shapes on textured backgrounds ------------------------------------------------------------------

SHAPE_CLASSES: Tuple[str, ...] = ("background", "disc", "square", "triangle")


def _shape_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> Tensor:
    """Bool [size, size]: the pixels whose centres fall inside shape ``kind`` (1 disc, 2 square, 3 triangle) of
    circumradius ``r`` centred at (cx, cy), the square and the triangle turned by ``angle``."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5 - cy, torch.arange(size) + 0.5 - cx, indexing="ij")
    if kind == 1:
        return x * x + y * y <= r * r
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    if kind == 2:
        half = r / math.sqrt(2.0)
        return (u.abs() <= half) & (v.abs() <= half)
    # equilateral triangle: inside the three edges, each at distance r / 2 from the centre
    inside = torch.ones(size, size, dtype=torch.bool)
    for k in range(3):
        a = angle + math.pi / 2 + 2 * math.pi * k / 3
        inside &= x * math.cos(a) + y * math.sin(a) <= r / 2
    return inside


def shapes_segmentation(
    num_images: int,
    size: int = 64,
    *,
    max_objects: int = 3,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """A toy semantic-segmentation set: images float32 [N, 3, size, size] in 0..1 and per-pixel labels int64
    [N, size, size] indexing :data:`SHAPE_CLASSES` (0 background, 1 disc, 2 square, 3 triangle).

    Each image is a mid-grey blocky colour texture (random cell size) with fine noise, under 1 to ``max_objects``
    shapes of random kind, size (circumradius 14-24 % of the image side), rotation and saturated colour with a fine
    texture of their own, at least 2 px apart (a shape that would touch an earlier one is dropped)."""
    if num_images < 0 or max_objects < 1 or size < 16:
        raise ValueError(
            f"need num_images >= 0, max_objects >= 1 and size >= 16, got {num_images}, {max_objects}, {size}"
        )
    g = generator
    images = torch.empty(num_images, 3, size, size)
    labels = torch.zeros(num_images, size, size, dtype=torch.int64)
    for i in range(num_images):
        cells = int(torch.randint(4, 13, (1,), generator=g))
        img = 0.35 + 0.3 * _texture(size, cells, g)
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            kind = int(torch.randint(1, 4, (1,), generator=g))
            r = size * (0.14 + 0.10 * float(torch.rand((), generator=g)))
            cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
            angle = 2 * math.pi * float(torch.rand((), generator=g))
            mask = _shape_mask(kind, cx, cy, r, angle, size)
            if (labels[i][F.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0] > 0] > 0).any():
                continue  # keep a 2 px gap between shapes: an occluded shape could be any of them
            # each channel dark or bright, never the background's mid grey
            colour = torch.where(torch.rand(3, generator=g) < 0.5, 0.0, 0.8) + 0.2 * torch.rand(3, generator=g)
            fill = colour[:, None, None] + 0.1 * (torch.rand(1, size, size, generator=g) - 0.5)
            img = torch.where(mask, fill, img)
            labels[i][mask] = kind
        images[i] = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return images, labels


# ---- video: a textured square moving in one of four directions -----------------------------------------------------

DIRECTIONS: Tuple[str, ...] = ("right", "left", "down", "up")
_STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (dx, dy) per direction, image axes (y down)


class MotionClips(NamedTuple):
    """A generated action-recognition set: ``clips`` float32 [N, 3, T, H, W] in 0..1 (C3D's layout), ``labels``
    int64 [N] indexing :data:`DIRECTIONS`, and the exact forward optical ``flow`` float32 [N, T - 1, 2, H, W]:
    flow[n, t, :, y, x] = (u, v) moves pixel (x, y) of frame t to (x + u, y + v) in frame t + 1."""

    clips: Tensor
    labels: Tensor
    flow: Tensor


def motion_clips(
    num_clips: int,
    frames: int = 16,
    size: int = 32,
    *,
    object_size: int = 10,
    speeds: Tuple[int, ...] = (1, 2),
    generator: Optional[torch.Generator] = None,
) -> MotionClips:
    """Clips of a textured ``object_size`` square gliding over a static textured background at a constant integer
    speed (drawn from ``speeds``, px per frame) in one of the four :data:`DIRECTIONS` (the label, balanced: clip n
    moves in direction n % 4).

    The frame wraps around (a torus): every frame shows the square at a uniformly random place whatever the
    direction, so a single frame, or any set of frames taken without their order, says nothing about the class; only
    the order of the frames (motion) does. Integer positions make the flow exact: (dx, dy) * speed on the square's
    pixels, 0 on the background."""
    if num_clips < 0 or frames < 2 or not 2 <= object_size <= size // 2 or not speeds or min(speeds) < 1:
        raise ValueError(
            f"need num_clips >= 0, frames >= 2, 2 <= object_size <= size / 2 and speeds >= 1, got {num_clips}, "
            f"{frames}, {object_size}, {size}, {speeds}"
        )
    g = generator
    clips = torch.empty(num_clips, 3, frames, size, size)
    flow = torch.zeros(num_clips, frames - 1, 2, size, size)
    labels = torch.arange(num_clips) % 4
    offsets = torch.arange(object_size)
    for n in range(num_clips):
        bg = 0.25 + 0.5 * _texture(size, int(torch.randint(3, 9, (1,), generator=g)), g)
        sprite = _texture(object_size, 3, g)
        speed = speeds[int(torch.randint(len(speeds), (1,), generator=g))]
        dx, dy = (speed * d for d in _STEPS[int(labels[n])])
        x0, y0 = torch.randint(size, (2,), generator=g).tolist()
        for t in range(frames):
            rows = (y0 + dy * t + offsets) % size
            cols = (x0 + dx * t + offsets) % size
            frame = bg.clone()
            frame[:, rows[:, None], cols[None, :]] = sprite
            clips[n, :, t] = frame
            if t + 1 < frames:
                flow[n, t, 0, rows[:, None], cols[None, :]] = float(dx)
                flow[n, t, 1, rows[:, None], cols[None, :]] = float(dy)
    return MotionClips(clips, labels, flow)
