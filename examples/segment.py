"""Train DeepLab v3 (visionops.models.segmentation) on generated shapes and measure its mIoU on a held-out split.

    python examples/segment.py [--backend visionops|pytorch] [--steps 2000] [--out segment.png] [--seed 0]

Nothing is downloaded: images of discs, squares and triangles on textured backgrounds come from
visionops.models.data.shapes_segmentation. Prints the training loss and the held-out mIoU as training goes, the
final per-class IoU, and writes a PNG with rows of input / truth / prediction.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from visionops.models import data  # noqa: E402
from visionops.models.segmentation import DeepLabV3, mean_iou  # noqa: E402

# background, disc, square, triangle
PALETTE = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.3, 0.2], [0.2, 0.7, 0.3], [0.3, 0.4, 0.95]])


@torch.no_grad()
def predict(model: DeepLabV3, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def per_class_iou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list:
    return [
        (((pred == c) & (labels == c)).sum() / ((pred == c) | (labels == c)).sum()).item() for c in range(num_classes)
    ]


def save_figure(path: Path, images: torch.Tensor, labels: torch.Tensor, pred: torch.Tensor) -> None:
    """Three rows (input, truth, prediction) of ``len(images)`` tiles, 2x nearest upscaled, as a PNG."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    rows = torch.cat([images, PALETTE[labels].permute(0, 3, 1, 2), PALETTE[pred].permute(0, 3, 1, 2)])
    grid = make_grid(rows, nrow=len(images), padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=2, mode="nearest")[0]
    write_png((grid * 255).round().to(torch.uint8), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("visionops", "pytorch"), default="visionops")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side (px)")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("segment.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # nothing else should draw from the global generator; fixed all the same
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = data.shapes_segmentation(args.train_images, args.size, generator=gen)
    test_x, test_y = data.shapes_segmentation(200, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    print(
        f"data: {args.train_images} training / 200 held-out images {args.size}x{args.size} "
        f"({time.perf_counter() - start:.1f} s)"
    )

    model = DeepLabV3(
        len(data.SHAPE_CLASSES),
        args.backend,
        width=args.width,
        output_stride=args.output_stride,
        generator=torch.Generator().manual_seed(args.seed),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.steps, pct_start=0.1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train_x), (args.batch,), generator=gen)
        model.train()
        loss = model.loss(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps:
            miou = mean_iou(predict(model, test_x), test_y, len(data.SHAPE_CLASSES)).item()
            print(
                f"step {step:5d}  loss {loss.item():.4f}  held-out mIoU {miou:.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    pred = predict(model, test_x)
    ious = per_class_iou(pred, test_y, len(data.SHAPE_CLASSES))
    print("per-class IoU: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(data.SHAPE_CLASSES, ious)))
    print(f"held-out mIoU ({args.backend}): {mean_iou(pred, test_y, len(data.SHAPE_CLASSES)).item():.3f}")
    save_figure(args.out, test_x[:8], test_y[:8], pred[:8])
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
