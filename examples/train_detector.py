"""Train a small detector on generated shapes and score it on a held-out generated split.

    python examples/train_detector.py                 # Faster R-CNN
    python examples/train_detector.py --masks         # Mask R-CNN (box and mask mAP)
    python examples/train_detector.py --ssd           # SSD

The images are 128x128 textured backgrounds with clutter under 1-4 discs, squares and triangles (the three classes,
overlapping at times; ``visionops.models.data.shapes_detection``). Training runs on the CPU with the visionops
backend; the box mAP@0.5 (and, with ``--masks``, the mask mAP@0.5) on held-out images is computed with
``torchmetrics.detection.MeanAveragePrecision``. The weights are saved to ``--out`` (they load into either backend),
and a training step is timed with each backend on the same weights and batch.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import torch
from torchmetrics.detection import MeanAveragePrecision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from visionops.models import data, detection  # noqa: E402

NUM_CLASSES = 4  # background + disc, square, triangle


class Settings(NamedTuple):
    build: Callable[..., torch.nn.Module]  # (backend, generator) -> model
    steps: int
    batch: int
    lr: float
    train_images: int
    optimizer: str = "adamw"  # "adamw" (weight decay 1e-4) or "sgd" (momentum 0.9, weight decay 5e-4)


SETTINGS: Dict[str, Settings] = {
    "faster_rcnn": Settings(
        lambda backend, g: detection.FasterRCNN(NUM_CLASSES, backend=backend, generator=g),
        steps=1500,
        batch=8,
        lr=2e-3,
        train_images=800,
    ),
    "mask_rcnn": Settings(
        lambda backend, g: detection.MaskRCNN(NUM_CLASSES, backend=backend, generator=g, box_batch_size_per_image=64),
        steps=1000,
        batch=8,
        lr=2e-3,
        train_images=800,
    ),
    "ssd": Settings(
        lambda backend, g: detection.SSD(NUM_CLASSES, backend=backend, generator=g),
        steps=4000,
        batch=16,
        lr=0.02,
        train_images=4000,
        optimizer="sgd",
    ),
}


def flip(images: torch.Tensor, targets: List[dict], which: torch.Tensor):
    """Mirror the images chosen by ``which`` (bool [B]) left to right, with their boxes and masks."""
    images = torch.where(which[:, None, None, None], images.flip(-1), images)
    w = images.shape[-1]
    out = []
    for t, f in zip(targets, which.tolist()):
        if f:
            t = dict(
                t,
                boxes=torch.stack([w - t["boxes"][:, 2], t["boxes"][:, 1], w - t["boxes"][:, 0], t["boxes"][:, 3]], 1),
            )
            if "masks" in t:
                t["masks"] = t["masks"].flip(-1)
        out.append(t)
    return images, out


def train(model, images, targets, settings: Settings, masks: bool, seed: int) -> float:
    """AdamW (or SGD) with a linear warm-up and a cosine decay, random batches with random flips; returns the
    seconds."""
    g = torch.Generator().manual_seed(seed)
    if settings.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps)),
    )
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        idx = torch.randint(len(images), (settings.batch,), generator=g)
        keys = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
        batch, tgts = flip(
            images[idx],
            [{k: targets[i][k] for k in keys} for i in idx.tolist()],
            torch.rand(len(idx), generator=g) < 0.5,
        )
        losses = model(batch, tgts)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == settings.steps - 1:
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(f"step {step:4d}  loss {loss.item():.3f}  ({parts})  {time.perf_counter() - start:.0f} s", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, images, targets, masks: bool) -> Dict[str, float]:
    model.eval()
    boxes_map = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5])
    mask_map = MeanAveragePrecision(iou_type="segm", iou_thresholds=[0.5]) if masks else None
    for start in range(0, len(images), 16):
        outs = model(images[start : start + 16])
        tgts = targets[start : start + 16]
        boxes_map.update([{k: o[k] for k in ("boxes", "scores", "labels")} for o in outs], tgts)
        if mask_map is not None:
            preds = [{"masks": o["masks"][:, 0] > 0.5, "scores": o["scores"], "labels": o["labels"]} for o in outs]
            mask_map.update(preds, [{"masks": t["masks"].bool(), "labels": t["labels"]} for t in tgts])
    result = {"box mAP@0.5": float(boxes_map.compute()["map_50"])}
    if mask_map is not None:
        result["mask mAP@0.5"] = float(mask_map.compute()["map_50"])
    return result


def step_time(settings: Settings, state: dict, images, targets, masks: bool, repeats: int = 5) -> Dict[str, float]:
    """Seconds per training step (forward, backward, optimizer) of each backend from the same weights and batch."""
    keys = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
    batch, tgts = images[: settings.batch], [{k: t[k] for k in keys} for t in targets[: settings.batch]]
    out = {}
    for backend in ("visionops", "pytorch"):
        model = settings.build(backend, torch.Generator().manual_seed(0))
        model.load_state_dict(state)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-5)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            loss = sum(model(batch, tgts).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out[backend] = sorted(times[1:])[len(times[1:]) // 2]  # median, the first step warms up
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--masks", action="store_true", help="train Mask R-CNN")
    kind.add_argument("--ssd", action="store_true", help="train SSD")
    parser.add_argument("--steps", type=int, help="training steps (default: per model)")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="where to save the weights (default: <model>.pt)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "mask_rcnn" if args.masks else "ssd" if args.ssd else "faster_rcnn"
    settings = SETTINGS[name]
    if args.steps:
        settings = settings._replace(steps=args.steps)

    t = time.perf_counter()
    images, targets = data.shapes_detection(settings.train_images, generator=torch.Generator().manual_seed(args.seed))
    test_images, test_targets = data.shapes_detection(
        args.test_images, generator=torch.Generator().manual_seed(args.seed + 1000)
    )
    print(f"generated {len(images)} training and {len(test_images)} held-out images in {time.perf_counter() - t:.0f} s")

    model = settings.build("visionops", torch.Generator().manual_seed(args.seed))
    seconds = train(model, images, targets, settings, args.masks, args.seed)
    scores = evaluate(model, test_images, test_targets, args.masks)
    out = args.out or f"{name}.pt"
    torch.save(model.state_dict(), out)
    print(f"{name}: {settings.steps} steps of {settings.batch} images in {seconds:.0f} s; saved {out}")
    for k, v in scores.items():
        print(f"held-out {k}: {v:.3f} ({len(test_images)} images)")
    times = step_time(settings, model.state_dict(), images, targets, args.masks)
    print(
        f"training step, batch {settings.batch}: visionops {times['visionops'] * 1e3:.0f} ms, "
        f"pytorch {times['pytorch'] * 1e3:.0f} ms ({times['pytorch'] / times['visionops']:.2f}x)"
    )


if __name__ == "__main__":
    main()
