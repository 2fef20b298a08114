"""Times every case for visionops and its baseline in the same run and reports the ratio baseline / visionops."""

import datetime
import json
import os
import platform
import re
from typing import List

import torch
import torch.utils.benchmark as tbench

from visionops.bench.case import Case


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    import visionops

    out = {"python": platform.python_version(), "torch": torch.__version__, "visionops": visionops.__version__}
    for name in ("torchvision", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def select(cases: List[Case], device: str, quick: bool, pattern: str) -> List[Case]:
    regex = re.compile(pattern, re.IGNORECASE) if pattern else None
    return [
        c
        for c in cases
        if device in c.devices and (c.quick or not quick) and (regex is None or regex.search(f"{c.op} {c.name}"))
    ]


def time_fn(fn, threads: int, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark: warm-up, CUDA synchronisation, pinned threads)."""
    fn()  # warm-up (first-call allocations, Triton JIT, lazy init)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run(cases: List[Case], device: str, threads: int, min_run_time: float, progress=None) -> List[dict]:
    results = []
    for case in cases:
        if progress is not None:
            progress.set_description(f"{case.op} {case.name}")
        row = {
            "op": case.op,
            "case": case.name,
            "device": device,
            "baseline": case.baseline,
        }
        try:
            ours, base, check = case.make(torch.device(device))
            check(ours(), base())
            row["visionops_ms"] = time_fn(ours, threads, min_run_time) * 1e3
            row["baseline_ms"] = time_fn(base, threads, min_run_time) * 1e3
            row["ratio"] = row["baseline_ms"] / row["visionops_ms"]
        except Exception as e:  # report and go on: one broken case must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress.update(1)
    return results


def format_table(results: List[dict]) -> str:
    header = f"{'op':<14} {'case':<30} {'device':<6} {'visionops':>11} {'baseline':>11} {'ratio':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['op']:<14} {r['case']:<30} {r['device']:<6} ERROR {r['error']}")
            continue
        lines.append(
            f"{r['op']:<14} {r['case']:<30} {r['device']:<6} {r['visionops_ms']:>9.3f}ms "
            f"{r['baseline_ms']:>9.3f}ms {r['ratio']:>7.2f}x"
        )
    return "\n".join(lines)


def save_json(results: List[dict], path: str, devices: dict, threads: int) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "devices": devices,
        "threads": threads,
        "results": results,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def save_plot(results: List[dict], path: str, title: str) -> bool:
    """Horizontal bars of baseline/visionops ratios (log scale). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in results if "ratio" in r]
    if not ok:
        return False
    labels = [f"{r['op']} {r['case']} ({r['device']})" for r in ok]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(ok) + 1.5))
    colors = ["tab:green" if r["ratio"] >= 1.0 else "tab:red" for r in ok]
    ax.barh(range(len(ok)), [r["ratio"] for r in ok], color=colors)
    for i, r in enumerate(ok):
        ax.text(r["ratio"], i, f" {r['ratio']:.1f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(ok)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up vs baseline (baseline time / visionops time)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
