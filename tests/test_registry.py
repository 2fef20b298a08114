"""Completeness: every op declared in the registry, and every public name that runs a kernel, has a conformance class
(a subclass of visionops.testing.OpConformance in one of the tests/test_*.py files)."""

import importlib
import importlib.util
import inspect
import pathlib
import sys
import types

import pytest

import visionops
from visionops import _registry as registry
from visionops.testing import OpConformance

TESTS = pathlib.Path(__file__).parent


def conformance_classes():
    """Every OpConformance subclass defined in tests/test_*.py (the modules are imported if pytest has not)."""
    for path in sorted(TESTS.glob("test_*.py")):
        if path.stem not in sys.modules:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
    found, todo = [], list(OpConformance.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [c for c in found if c.__module__.startswith("test_") and c.op]  # op "": a family's shared base


def _codes(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def dispatched_ops(obj, seen=None) -> set:
    """Registry ops a public function or class reaches through ``registry.dispatch``, following the visionops
    functions and classes it names (statically: the names in its code, resolved in its module)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if inspect.isclass(obj):
        return set().union(
            *[
                dispatched_ops(v, seen)
                for v in vars(obj).values()
                if inspect.isfunction(v) or isinstance(v, (staticmethod, classmethod))
            ]
        )
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if not inspect.isfunction(obj) or not obj.__module__.startswith("visionops"):
        return set()
    ops = set()
    for code in _codes(obj.__code__):
        if "dispatch" in code.co_names and obj.__globals__.get("registry") is registry:
            ops |= {c for c in code.co_consts if isinstance(c, str) and c in registry.OPS}
        for name in code.co_names:
            target = obj.__globals__.get(name)
            if inspect.isfunction(target) or inspect.isclass(target):
                ops |= dispatched_ops(target, seen)
    return ops


def test_every_registry_op_has_a_conformance_class():
    classes = conformance_classes()
    covered = {c.op for c in classes}
    missing = [op for op in registry.OPS if op not in covered]
    assert not missing, f"ops declared in visionops._registry.OPS without a conformance class: {missing}"
    unknown = sorted(c.__name__ for c in classes if c.op not in registry.OPS)
    assert not unknown, f"conformance classes naming no registry op: {unknown}"
    ops = [c.op for c in classes]
    assert len(ops) == len(set(ops)), f"two conformance classes for one op: {ops}"


def test_every_public_kernel_wrapper_has_a_conformance_class():
    classes = conformance_classes()
    covered = {c.op for c in classes} | {name for c in classes for name in c.covers}
    wrappers = {name: dispatched_ops(getattr(visionops, name)) for name in visionops.__all__}
    wrappers = {name: ops for name, ops in wrappers.items() if ops}
    missing = sorted(name for name in wrappers if name not in covered)
    assert not missing, f"public names running kernels without a conformance class (op or covers): {missing}"
    stale = sorted(name for c in classes for name in c.covers if name not in wrappers)
    assert not stale, f"`covers` names that are not public kernel wrappers: {stale}"


@pytest.mark.parametrize(
    "name,ops",
    [
        ("nms", {"nms"}),
        ("roi_align", {"roi_align"}),
        ("RoIPool", {"roi_pool"}),
        ("grid_anchors", {"grid_anchors"}),
        ("AnchorGenerator", {"grid_anchors"}),
        ("MultiScaleRoIAlign", {"multi_scale_roi_align", "roi_align"}),
        ("BoxCoder", {"decode_boxes", "encode_boxes"}),
        ("filter_boxes", {"filter_boxes"}),
        ("box_area", set()),
        ("cell_anchors", set()),
        ("DefaultBoxGenerator", set()),
    ],
)
def test_kernel_wrapper_detection(name, ops):
    """The detector above finds what each wrapper runs (so an empty answer cannot pass the checks vacuously)."""
    assert dispatched_ops(getattr(visionops, name)) == ops


def test_conformance_classes_are_collected():
    for cls in conformance_classes():
        assert cls.__name__.startswith("Test"), f"{cls.__name__}: pytest collects only Test* classes"
        assert cls.op, f"{cls.__name__} declares no op"
