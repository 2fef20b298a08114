"""Autograd and fake-kernel helpers shared by the op wrappers. An op is named either by its dispatcher name
("visionops::<op>", the C++ ops) or by the ``torch.library.custom_op`` object (the Triton ops)."""
import torch


def op_callable(op):
    """The callable of a "visionops::<op>" name, or the custom op itself."""
    return getattr(torch.ops.visionops, op.split("::")[1]) if isinstance(op, str) else op


def register_fake(op, fake) -> None:
    if isinstance(op, str):
        torch.library.register_fake(op, fake)
    else:
        op.register_fake(fake)


def register_autograd(op, backward, setup_context) -> None:
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
    else:
        op.register_autograd(backward, setup_context=setup_context)


def refuse_double_backward(backward_op, op_name: str) -> None:
    """Give a backward op an autograd formula that raises: the backward kernels are not themselves differentiable,
    as in torchvision."""

    def backward(ctx, *grads):
        raise RuntimeError(f"visionops: double backward of {op_name} is not supported")

    def setup_context(ctx, inputs, output):
        pass

    register_autograd(backward_op, backward, setup_context)
