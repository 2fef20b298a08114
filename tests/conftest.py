"""Shared test set-up. Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET must be set
before triton (and so visionops) is imported, hence here, at the top of the first module pytest loads."""

import os

import pytest

if os.environ.get("VISIONOPS_TEST_CUDA") != "1":  # on a GPU machine gpu_check.sh sets this to test compiled Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")


import visionops  # noqa: E402,F401


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
