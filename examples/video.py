"""Recognise the direction of motion in generated clips with C3D and a two-stream network, against frame averaging.

    python examples/video.py [--backend visionops|pytorch] [--steps 300] [--c3d-steps 1000] [--seed 0]

Nothing is downloaded: visionops.models.data.motion_clips draws clips of a textured square gliding right, left,
down or up (the four classes) over a static textured background, with their exact optical flow. Three networks
train on the same clips and are scored on a held-out split:

* C3D (3D convolutions over the RGB clip) sees motion directly;
* the two-stream network sees one RGB frame (its spatial stream) and a stack of flow fields (its temporal stream);
* frame averaging, one 2D network applied to each frame with the scores averaged, sees every frame but not their
  order: the square is equally likely anywhere in any frame whatever its direction, so it stays near chance (25 %).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from visionops.models import data  # noqa: E402
from visionops.models.video import C3D, FrameAveraging, TwoStream, stack_flow  # noqa: E402

FLOW_LENGTH = 5  # stacked flow fields of the temporal stream (the paper's L is 10, on 25 fps video)


def train(name, model, loss_fn, scores_fn, train_set, test_set, steps, batch, lr, gen) -> float:
    """Adam on random batches of ``train_set``; returns the held-out accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(len(train_set.labels), (batch,), generator=gen)
        model.train()
        loss = loss_fn(model, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            print(
                f"  {name}: step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)", flush=True
            )
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [scores_fn(model, test_set, slice(i, i + 50)).argmax(1) for i in range(0, len(test_set.labels), 50)]
        )
    return (pred == test_set.labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("visionops", "pytorch"), default="visionops")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the 2D networks")
    parser.add_argument("--c3d-steps", type=int, default=1000, help="training steps of C3D")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="frame side (px)")
    parser.add_argument("--width", type=float, default=1 / 16, help="channel multiplier of every network")
    parser.add_argument("--train-clips", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)  # dropout draws from the global generator
    start = time.perf_counter()
    train_set = data.motion_clips(
        args.train_clips, args.frames, args.size, generator=torch.Generator().manual_seed(args.seed)
    )
    test_set = data.motion_clips(200, args.frames, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    print(
        f"data: {args.train_clips} training / 200 held-out clips of {args.frames} frames {args.size}x{args.size} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    mid = (args.frames - 1 - FLOW_LENGTH) // 2  # the flow stack and the RGB frame from the middle of the clip

    def net_gen():
        return torch.Generator().manual_seed(args.seed)

    runs = {
        "C3D": (
            # no dropout: at this width (256-wide fc6 / fc7) it stalls training for hundreds of steps
            C3D(4, args.backend, width=args.width, dropout=0.0, generator=net_gen()),
            lambda m, i: F.cross_entropy(m(train_set.clips[i]), train_set.labels[i]),
            lambda m, s, i: m(s.clips[i]),
            5e-4,
            args.c3d_steps,
        ),
        "two-stream": (
            TwoStream(4, args.backend, flow_length=FLOW_LENGTH, width=args.width, generator=net_gen()),
            lambda m, i: m.loss(
                train_set.clips[i][:, :, mid + FLOW_LENGTH // 2],
                stack_flow(train_set.flow[i], mid, FLOW_LENGTH),
                train_set.labels[i],
            ),
            lambda m, s, i: m(s.clips[i][:, :, mid + FLOW_LENGTH // 2], stack_flow(s.flow[i], mid, FLOW_LENGTH)),
            2e-3,
            args.steps,
        ),
        "frame averaging": (
            FrameAveraging(4, args.backend, width=args.width, generator=net_gen()),
            lambda m, i: m.loss(train_set.clips[i], train_set.labels[i]),
            lambda m, s, i: m(s.clips[i]),
            2e-3,
            args.steps,
        ),
    }
    accuracies = {}
    gen = torch.Generator().manual_seed(args.seed + 2)
    for name, (model, loss_fn, scores_fn, lr, steps) in runs.items():
        start = time.perf_counter()
        print(f"{name} ({args.backend}):", flush=True)
        accuracies[name] = train(name, model, loss_fn, scores_fn, train_set, test_set, steps, args.batch, lr, gen)
        print(f"  held-out accuracy {accuracies[name]:.1%}  ({time.perf_counter() - start:.0f} s)")
    print("held-out accuracy: " + ", ".join(f"{n} {a:.1%}" for n, a in accuracies.items()) + " (chance 25.0%)")


if __name__ == "__main__":
    main()
