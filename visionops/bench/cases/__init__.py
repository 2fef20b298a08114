"""Benchmark cases, one module per op family; each defines CASES (a list of visionops.bench.case.Case)."""

import importlib
import pkgutil


def all_cases():
    cases = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases += importlib.import_module(f"{__name__}.{info.name}").CASES
    return cases
