"""Data-parallel training of a small detector head built on visionops' ops, with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # gloo on CPU, nccl when CUDA is available
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 20 --dtype float32

The model: two strided ``visionops.nn.Conv2d`` layers, ``visionops.roi_align`` pooling of fixed proposals (ground
truth boxes jittered, plus random boxes) and a two-layer box head predicting a class and class-wise box deltas.
Proposals are labelled by ``visionops.box_iou`` against the ground truth, and the regression targets come from
``visionops.encode_boxes``. The images (``visionops.models.data.shapes_detection``) and proposals are generated from
the seed, so every process holds the same set and trains on its own share of each batch: every step's loss averaged
over the processes, and the weights, equal those of one process training on the whole batch.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import visionops  # noqa: E402
from visionops.models import data  # noqa: E402

NUM_CLASSES = 4  # background + disc, square, triangle
PROPOSALS = 16  # per image: the same count everywhere, so every process's loss is a mean over as many terms
WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # box coder weights, as torchvision's R-CNN heads


class Batch(NamedTuple):
    images: Tensor  # [B, 3, H, W]
    proposals: List[Tensor]  # B x [PROPOSALS, 4]
    labels: Tensor  # [B * PROPOSALS] class per proposal, 0: background
    targets: Tensor  # [B * PROPOSALS, 4] encoded boxes of the matched ground truth


class BoxHead(nn.Module):
    """Conv features at stride 4, RoIAlign to 5x5, two fully connected layers, class and box outputs."""

    def __init__(self, width: int = 16, hidden: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.conv1 = visionops.nn.Conv2d(3, width, 3, stride=2, padding=1, backend=backend)
        self.conv2 = visionops.nn.Conv2d(width, width, 3, stride=2, padding=1, backend=backend)
        self.fc = nn.Linear(width * 25, hidden)
        self.cls = nn.Linear(hidden, NUM_CLASSES)
        self.box = nn.Linear(hidden, 4 * NUM_CLASSES)

    def forward(self, images: Tensor, proposals: List[Tensor]):
        x = F.relu(self.conv2(F.relu(self.conv1(images))))
        pooled = visionops.roi_align(x, proposals, 5, 0.25, 2, aligned=True, backend=self.backend)
        h = F.relu(self.fc(pooled.flatten(1)))
        return self.cls(h), self.box(h).view(-1, NUM_CLASSES, 4)


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy over every proposal plus smooth L1 of the true class's deltas over the foreground ones, both
    divided by the number of proposals (a mean over a fixed count, so shards average to the whole batch's)."""
    logits, deltas = model(batch.images, batch.proposals)
    n = batch.labels.numel()
    fg = batch.labels > 0
    box = F.smooth_l1_loss(deltas[fg, batch.labels[fg]], batch.targets[fg], beta=1 / 9, reduction="sum")
    return F.cross_entropy(logits, batch.labels) + box / n


def make_dataset(num_images: int, seed: int = 0, dtype=torch.float64, device="cpu") -> Batch:
    """Images, proposals and their targets, the same in every process for a given seed."""
    g = torch.Generator().manual_seed(seed)
    images, gts = data.shapes_detection(num_images, (64, 64), generator=g)
    proposals, labels, targets = [], [], []
    for gt in gts:
        boxes = gt["boxes"].double()
        k = PROPOSALS // 2
        base = boxes[torch.randint(0, len(boxes), (k,), generator=g)]
        size = (base[:, 2:] - base[:, :2]).repeat(1, 2)
        jittered = base + (torch.rand(k, 4, generator=g, dtype=torch.float64) - 0.5) * 0.3 * size
        xy = torch.rand(PROPOSALS - k, 2, generator=g, dtype=torch.float64) * 48
        random = torch.cat([xy, xy + 8 + torch.rand(PROPOSALS - k, 2, generator=g, dtype=torch.float64) * 24], 1)
        props = torch.cat([jittered, random]).clamp(0, 64)
        iou, match = visionops.box_iou(props, boxes).max(1)
        labels.append(torch.where(iou >= 0.5, gt["labels"][match], 0))
        targets.append(visionops.encode_boxes(boxes[match], props, WEIGHTS))
        proposals.append(props.to(dtype))
    return Batch(
        images.to(device, dtype),
        [p.to(device) for p in proposals],
        torch.cat(labels).to(device),
        torch.cat(targets).to(device, dtype),
    )


def shard(dataset: Batch, step: int, batch: int, rank: int = 0, world: int = 1) -> Batch:
    """Process ``rank``'s share (``batch`` images) of step ``step``'s global batch of ``batch * world`` images."""
    lo = (step * world + rank) * batch
    hi = lo + batch
    props = slice(lo * PROPOSALS, hi * PROPOSALS)
    return Batch(dataset.images[lo:hi], dataset.proposals[lo:hi], dataset.labels[props], dataset.targets[props])


def train(model: nn.Module, dataset: Batch, steps: int, batch: int, rank: int = 0, world: int = 1, lr: float = 0.05):
    """SGD with momentum; returns every step's loss on this process's share."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, shard(dataset, step, batch, rank, world))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="images per process and step")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        dtype = getattr(torch, args.dtype)
        dataset = make_dataset(args.steps * args.batch * world, args.seed, dtype, device)
        torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
        model = BoxHead().to(device, dtype)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        losses = train(ddp, dataset, args.steps, args.batch, rank, world)
        dist.all_reduce(losses)  # the global batch's loss: the mean of the processes' losses
        losses /= world
        if rank == 0:
            backend = dist.get_backend()
            print(f"{world} processes ({backend}, {device.type}), {args.batch} images each per step")
            for step, loss in enumerate(losses.tolist()):
                print(f"step {step:3d}  loss {loss:.6f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
