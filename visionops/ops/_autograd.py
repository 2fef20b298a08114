"""Autograd helpers shared by the op wrappers."""
import torch


def refuse_double_backward(backward_op, op_name: str) -> None:
    """Give a backward op (a "visionops::_<op>_backward" name, or a Triton custom op) an autograd formula that raises:
    the backward kernels are not themselves differentiable, as in torchvision."""

    def backward(ctx, *grads):
        raise RuntimeError(f"visionops: double backward of {op_name} is not supported")

    def setup_context(ctx, inputs, output):
        pass

    if isinstance(backward_op, str):
        torch.library.register_autograd(backward_op, backward, setup_context=setup_context)
    else:
        backward_op.register_autograd(backward, setup_context=setup_context)
