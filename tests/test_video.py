"""visionops.models.video: C3D, two-stream and frame-averaging shapes, the two backends agreeing in training
(float64), and the motion-clip generator's exact flow."""

import pytest
import torch

from visionops.models import data
from visionops.models.video import C3D, FrameAveraging, TwoStream, stack_flow

BACKENDS = ("visionops", "pytorch")
WIDTH = 1 / 16  # C3D: 4, 8, 16, 32 channels and 256-wide fully connected layers; CNN-M alike


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def clips():
    return data.motion_clips(4, 8, 24, object_size=6, generator=_gen(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_c3d_shapes(backend):
    model = C3D(5, backend, width=WIDTH, generator=_gen(0)).eval()
    with torch.no_grad():
        full = torch.rand(1, 3, 16, 112, 112, generator=_gen(1))  # the paper's clip: pool5 gives 1x4x4
        assert model.features(full).shape == (1, 32, 1, 4, 4) and model(full).shape == (1, 5)
        small = torch.rand(2, 3, 8, 24, 24, generator=_gen(2))  # pooling adapts to small clips
        assert model(small).shape == (2, 5)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["conv1.weight", "conv1.bias"] and names[-2:] == ["fc8.weight", "fc8.bias"]
    assert sum(isinstance(m, torch.nn.Conv3d) for m in model.modules()) == 8
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 3  # fc6, fc7 and the classifier


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_stream_and_frame_averaging_shapes(backend, clips):
    two = TwoStream(4, backend, flow_length=3, width=WIDTH, generator=_gen(0)).eval()
    frames = FrameAveraging(4, backend, width=WIDTH, generator=_gen(0)).eval()
    with torch.no_grad():
        scores = two(clips.clips[:, :, 2], stack_flow(clips.flow, 2, 3))
        assert scores.shape == (4, 4)
        torch.testing.assert_close(scores.sum(1), torch.ones(4))  # averaged softmax scores
        avg = frames(clips.clips)
        assert avg.shape == (4, 4) and frames.frame_logits(clips.clips).shape == (4, 8, 4)
        # frame averaging does not see the order of the frames: reversing the clip (the opposite motion) changes
        # nothing, which is why it cannot tell the directions apart
        torch.testing.assert_close(frames(clips.clips.flip(2)), avg)
    with pytest.raises(ValueError, match="flow_stack"):
        two(clips.clips[:, :, 0], stack_flow(clips.flow, 0, 2))


def test_state_dicts_move_between_backends():
    for make in (
        lambda b, s: C3D(4, b, width=WIDTH, generator=_gen(s)),
        lambda b, s: TwoStream(4, b, flow_length=3, width=WIDTH, generator=_gen(s)),
        lambda b, s: FrameAveraging(4, b, width=WIDTH, generator=_gen(s)),
    ):
        a, b = make("visionops", 0), make("pytorch", 1)
        assert list(a.state_dict()) == list(b.state_dict())
        first = next(iter(a.state_dict()))  # a first convolution's weight: different seeds, different weights
        assert not torch.equal(a.state_dict()[first], b.state_dict()[first]), first
        b.load_state_dict(a.state_dict(), strict=True)
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k


def _agree_in_training(models, loss_fn, outputs_fn, steps: int = 3):
    """SGD steps on float64 twins, comparing outputs and every gradient after each; the loss must decrease."""
    models = {b: m.double().train() for b, m in models.items()}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for b, m in models.items()}
    losses = {b: [] for b in BACKENDS}
    for _ in range(steps):
        for b, m in models.items():
            opts[b].zero_grad()
            loss = loss_fn(m)
            loss.backward()
            losses[b].append(loss.item())
        with torch.no_grad():
            torch.testing.assert_close(
                outputs_fn(models["visionops"].eval()), outputs_fn(models["pytorch"].eval()), rtol=1e-9, atol=1e-12
            )
        for m in models.values():
            m.train()
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()
    for k, v in models["visionops"].state_dict().items():
        torch.testing.assert_close(v, models["pytorch"].state_dict()[k], rtol=1e-9, atol=1e-12, msg=k)
    assert losses["visionops"][-1] < losses["visionops"][0], losses
    torch.testing.assert_close(torch.tensor(losses["visionops"]), torch.tensor(losses["pytorch"]), rtol=1e-9, atol=0)


# dropout off: the two backends' networks would otherwise draw different masks from the global generator
def test_c3d_backends_agree_in_training_float64(clips):
    x, y = clips.clips.double(), clips.labels
    models = {b: C3D(4, b, width=WIDTH, dropout=0.0, generator=_gen(0)) for b in BACKENDS}
    _agree_in_training(models, lambda m: torch.nn.functional.cross_entropy(m(x), y), lambda m: m(x))


def test_two_stream_backends_agree_in_training_float64(clips):
    frame, flow, y = clips.clips[:, :, 3].double(), stack_flow(clips.flow, 2, 3).double(), clips.labels
    models = {b: TwoStream(4, b, flow_length=3, width=WIDTH, dropout=0.0, generator=_gen(0)) for b in BACKENDS}
    _agree_in_training(models, lambda m: m.loss(frame, flow, y), lambda m: m(frame, flow))


def test_frame_averaging_backends_agree_in_training_float64(clips):
    x, y = clips.clips.double(), clips.labels
    models = {b: FrameAveraging(4, b, width=WIDTH, dropout=0.0, generator=_gen(0)) for b in BACKENDS}
    _agree_in_training(models, lambda m: m.loss(x, y), lambda m: m(x))


def test_motion_clips_repeat_and_their_flow_is_exact():
    m = data.motion_clips(8, 6, 20, object_size=5, speeds=(1, 3), generator=_gen(5))
    again = data.motion_clips(8, 6, 20, object_size=5, speeds=(1, 3), generator=_gen(5))
    assert torch.equal(m.clips, again.clips) and torch.equal(m.flow, again.flow)
    assert m.clips.shape == (8, 3, 6, 20, 20) and m.flow.shape == (8, 5, 2, 20, 20)
    assert m.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and data.DIRECTIONS == ("right", "left", "down", "up")
    signs = {0: (1, 0), 1: (-1, 0), 2: (0, 1), 3: (0, -1)}
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    for n in range(8):
        for t in range(5):
            u, v = m.flow[n, t]
            moving = (u != 0) | (v != 0)
            assert moving.sum() == 25  # the whole 5x5 square moves, nothing else
            speed = u[moving].abs().max() + v[moving].abs().max()
            assert speed in (1, 3)
            assert (u[moving] == signs[int(m.labels[n])][0] * speed).all()
            assert (v[moving] == signs[int(m.labels[n])][1] * speed).all()
            # warping frame t by the flow gives frame t + 1 where the square lands (the frame wraps around)
            ty, tx = (ys + v.long()) % 20, (xs + u.long()) % 20
            src, dst = m.clips[n, :, t], m.clips[n, :, t + 1]
            assert torch.equal(dst[:, ty[moving], tx[moving]], src[:, moving])
            # and the background stays where the square is in neither frame
            landed = torch.zeros(20, 20, dtype=torch.bool)
            landed[ty[moving], tx[moving]] = True
            still = ~moving & ~landed
            assert torch.equal(dst[:, still], src[:, still])


def test_stack_flow_orders_fields_then_components():
    flow = torch.arange(4 * 2.0).reshape(1, 4, 2, 1, 1).expand(1, 4, 2, 3, 3)
    assert stack_flow(flow, 1, 2)[0, :, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # u1, v1, u2, v2
    with pytest.raises(ValueError, match="start"):
        stack_flow(flow, 3, 2)
