"""DistributedDataParallel over visionops' ops: two processes (gloo, CPU) training the detector head of
examples/ddp_train.py on halves of each batch get the losses, gradients and weights of one process training on the
whole batch (float64, so they agree up to the order of the gradient reduction)."""

import datetime
import importlib.util
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
WORLD, STEPS, BATCH, SEED = 2, 2, 2, 0
DEADLINE_S = 180  # the processes are killed past this, so a hung rendezvous or collective cannot hang CI


def _example():
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(ex, model, rank, world, batch):
    dataset = ex.make_dataset(STEPS * BATCH * WORLD, SEED)
    losses = ex.train(model, dataset, STEPS, batch, rank, world)
    params = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    # the last step's gradients stay in .grad after the optimiser step
    return losses, [p.detach().clone() for p in params.parameters()], [p.grad.clone() for p in params.parameters()]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        ex = _example()
        torch.manual_seed(SEED)
        model = ex.BoxHead(backend="cpp").double()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.save(_train(ex, ddp, rank, WORLD, BATCH), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ddp(out_dir: Path):
    ctx = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP training did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_matches_single_process(tmp_path):
    ranks = _run_ddp(tmp_path)

    ex = _example()
    torch.manual_seed(SEED)
    model = ex.BoxHead(backend="cpp").double()
    initial = [p.detach().clone() for p in model.parameters()]
    losses, params, grads = _train(ex, model, 0, 1, BATCH * WORLD)

    tight = dict(rtol=1e-10, atol=1e-12)
    # every process's loss is the mean over as many proposals, so their mean is the whole batch's loss
    torch.testing.assert_close(torch.stack([r[0] for r in ranks]).mean(0), losses, **tight)
    assert not torch.equal(ranks[0][0], ranks[1][0]), "the two processes trained on the same images"
    for r, (_, r_params, r_grads) in enumerate(ranks):
        for i, (got, exp) in enumerate(zip(r_grads, grads)):
            torch.testing.assert_close(got, exp, **tight, msg=lambda m: f"rank {r}, gradient {i}: {m}")
        for i, (got, exp, init) in enumerate(zip(r_params, params, initial)):
            torch.testing.assert_close(got, exp, **tight, msg=lambda m: f"rank {r}, parameter {i}: {m}")
            assert not torch.equal(got, init), f"parameter {i} did not train"
