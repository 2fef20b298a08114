"""Small CUDA calls of every op family, for `compute-sanitizer` (memcheck/racecheck) in gpu_check.sh."""
import torch

import visionops


def boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1).cuda()


def nms_family():
    b, s = boxes(300, 0), torch.randperm(300).float().cuda()
    idxs = torch.randint(0, 5, (300,)).cuda()
    for backend in ("cpp", "triton"):
        visionops.nms(b, s, 0.5, backend=backend)
        visionops.nms(b[:1], s[:1], 0.5, backend=backend)
        visionops.batched_nms(b, s, idxs, 0.5, backend=backend)
        a = b[:17].clone().requires_grad_()
        visionops.box_iou(a, b[:23], backend=backend).sum().backward()


CALLS = [nms_family]

if __name__ == "__main__":
    for call in CALLS:
        call()
        torch.cuda.synchronize()
        print("ok", call.__name__)
