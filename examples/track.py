"""Track a generated clip with SiamFC (fixed random weights, nothing downloaded) on both backends.

    python examples/track.py [--out track.png] [--frames 60] [--size 360] [--seed 0] [--weights-seed 0]

Prints the mean / max centre error and the frames per second of each backend (and of a tracker that never moves),
and writes a PNG of the true and tracked trajectories over the clip's last frame.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from visionops.models import data  # noqa: E402
from visionops.models.siamfc import SiamFC, SiamFCTracker  # noqa: E402

COLOURS = {"truth": "lime", "visionops": "red", "pytorch": "deepskyblue"}


def centers(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def run(backend: str, clip: data.TrackingClip, weights_seed: int):
    tracker = SiamFCTracker(SiamFC(backend, generator=torch.Generator().manual_seed(weights_seed)))
    tracker.init(clip.frames[0], clip.boxes[0])
    boxes = [clip.boxes[0].tolist()]
    start = time.perf_counter()
    for frame in clip.frames[1:]:
        boxes.append(tracker.update(frame))
    fps = (len(clip.frames) - 1) / (time.perf_counter() - start)
    return torch.tensor(boxes, dtype=torch.float64), fps


def draw_matplotlib(path: Path, frame: torch.Tensor, paths: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(frame.permute(1, 2, 0).numpy())
    for name, (boxes, style) in paths.items():
        c = centers(boxes)
        ax.plot(c[:, 0], c[:, 1], style, color=COLOURS[name], lw=2, label=name)
        x1, y1, x2, y2 = boxes[-1].tolist()
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=COLOURS[name], lw=1.5, ls=style))
    ax.plot(*centers(paths["truth"][0])[0].tolist(), "o", color="white", ms=6, label="start")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_torchvision(path: Path, frame: torch.Tensor, paths: dict) -> None:
    from torchvision.io import write_png
    from torchvision.utils import draw_bounding_boxes, draw_keypoints

    img = frame
    for name, (boxes, _) in paths.items():
        # dots, not connectivity: torchvision draws the connecting lines in white whatever the colour
        img = draw_keypoints(img, centers(boxes).float()[None], colors=COLOURS[name], radius=2)
        img = draw_bounding_boxes(img, boxes[-1:].float(), colors=COLOURS[name], width=2)
    write_png(img, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("track.png"), help="trajectory plot (PNG)")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated clip")
    parser.add_argument("--weights-seed", type=int, default=0, help="seed of the (untrained) weights")
    args = parser.parse_args()

    clip = data.tracking_clip(args.frames, args.size, generator=torch.Generator().manual_seed(args.seed))
    static = clip.boxes[:1].expand_as(clip.boxes)
    paths = {"truth": (clip.boxes, "-")}
    print(f"clip: {args.frames} frames {args.size}x{args.size}, seed {args.seed}; centre error in px")
    results = [("static", static, None)] + [(b, *run(b, clip, args.weights_seed)) for b in ("visionops", "pytorch")]
    for name, boxes, fps in results:
        err = (centers(boxes) - clip.centers).norm(dim=1)
        rate = f"  {fps:6.2f} frames/s" if fps is not None else ""
        print(f"{name:>10}: mean {err.mean():6.2f}  max {err.max():6.2f}{rate}")
        if name != "static":
            paths[name] = (boxes, "--" if name == "pytorch" else "-")

    try:
        draw_matplotlib(args.out, clip.frames[-1], paths)
    except ImportError:
        draw_torchvision(args.out, clip.frames[-1], paths)
    print(f"trajectories: {args.out}")


if __name__ == "__main__":
    main()
