"""Run a detector on generated images and draw what it finds.

    python examples/detect.py --weights faster_rcnn.pt --out docs/detect.png
    python examples/detect.py --masks --weights mask_rcnn.pt --out docs/detect-masks.png

Builds the Faster R-CNN (``--masks``: Mask R-CNN) of ``visionops.models.detection``, loads ``--weights`` (from
``examples/train_detector.py``; without them the weights are random and the drawing shows untrained guesses), runs it
on held-out generated images (``visionops.models.data.shapes_detection``) and writes a PNG with the detected boxes,
classes and scores (and masks) over the images, the true boxes dashed. Prints the inference time of the visionops
and pytorch backends on the same weights.
"""

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from visionops.models import data  # noqa: E402
from visionops.models.data import SHAPE_CLASSES  # noqa: E402
from visionops.models.detection import FasterRCNN, MaskRCNN  # noqa: E402

COLOURS = {1: "tab:orange", 2: "tab:cyan", 3: "tab:pink"}


def build(masks: bool, backend: str, weights):
    cls = MaskRCNN if masks else FasterRCNN
    model = cls(len(SHAPE_CLASSES), backend=backend, generator=torch.Generator().manual_seed(0))
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def timed(model, images, repeats: int = 10):
    model(images)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = model(images)
        times.append(time.perf_counter() - t)
    return out, sorted(times)[repeats // 2]


def draw(images, outputs, targets, score: float, path: str) -> None:
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4.2), squeeze=False)
    for ax, img, out, tgt in zip(axes[0], images, outputs, targets):
        ax.imshow(img.permute(1, 2, 0).numpy())
        for x1, y1, x2, y2 in tgt["boxes"].tolist():
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=0.8))
        keep = out["scores"] >= score
        for i in keep.nonzero().flatten().tolist():
            label, colour = int(out["labels"][i]), COLOURS.get(int(out["labels"][i]), "yellow")
            if "masks" in out:
                overlay = torch.zeros(*img.shape[1:], 4)
                overlay[..., :3] = torch.tensor(matplotlib.colors.to_rgb(colour))
                overlay[..., 3] = 0.45 * (out["masks"][i, 0] > 0.5).float()
                ax.imshow(overlay.numpy())
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=colour, lw=1.5))
            text = f"{SHAPE_CLASSES[label]} {float(out['scores'][i]):.2f}"
            ax.text(x1, y1 - 2, text, color=colour, fontsize=8, bbox=dict(fc="black", alpha=0.6, pad=1, lw=0))
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", action="store_true", help="Mask R-CNN")
    parser.add_argument("--weights", help="a state_dict saved by examples/train_detector.py")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated images")
    parser.add_argument("--score", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("--out", default="detect.png")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    images, targets = data.shapes_detection(args.images, generator=torch.Generator().manual_seed(10_000 + args.seed))
    results = {b: timed(build(args.masks, b, args.weights), images) for b in ("visionops", "pytorch")}
    (ours, t_ours), (_, t_base) = results["visionops"], results["pytorch"]
    print(
        f"inference, {args.images} images {tuple(images.shape[-2:])}: visionops {t_ours * 1e3:.1f} ms, "
        f"pytorch {t_base * 1e3:.1f} ms ({t_base / t_ours:.2f}x)"
    )
    draw(images, ours, targets, args.score, args.out)


if __name__ == "__main__":
    main()
