"""Times every case for visionops and its baseline in the same run and reports the ratio baseline / visionops."""

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import statistics
from typing import Dict, List

import torch

from visionops.bench import bounds
from visionops.bench.case import Case


def _import_torch_benchmark():
    # torch.utils.benchmark imports torch.utils.cpp_extension, which on a machine without a CUDA runtime logs a
    # guessed CUDA_HOME ("No CUDA runtime is found, using CUDA_HOME=..."). Nothing is compiled here, so the guess is
    # unused and the line would only mislead (visionops' build picks CUDA_HOME itself, see setup.py).
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.benchmark as tbench
    finally:
        log.setLevel(level)
    return tbench


tbench = _import_torch_benchmark()


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


def run(cases: List[Case], device: str, threads: int, min_run_time: float, progress=None, machine=None) -> List[dict]:
    """One pass: each case checked, then timed for visionops and for its baseline. With ``machine`` (the rates of
    visionops.bench.bounds.measure), a case that declares its work also gets its lower bound."""
    results = []
    for case in cases:
        if progress is not None:
            progress.set_description(f"{case.op} {case.name}")
        row = {"op": case.op, "case": case.name, "device": device, "baseline": case.baseline}
        try:
            ours, base, check = case.make(torch.device(device))
            check(ours(), base())
            row["visionops_ms"] = time_fn(ours, threads, min_run_time) * 1e3
            row["baseline_ms"] = time_fn(base, threads, min_run_time) * 1e3
            row["ratio"] = row["baseline_ms"] / row["visionops_ms"]
            work = case.tags.get("work") if machine is not None else None
            if work is not None:
                row["bound_ms"] = bounds.bound_seconds(work(), machine) * 1e3
                row["of_bound"] = row["bound_ms"] / row["visionops_ms"]
        except Exception as e:  # report and go on: one broken case must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
        results.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress.update(1)
    return results


def combine(passes: List[List[dict]]) -> List[dict]:
    """One row per case from several passes over the same cases: the median of each time and of the per-pass ratios
    (a ratio compares two times taken one right after the other), the ratio's range, and every pass's values."""
    seen: Dict[tuple, List[dict]] = {}
    for results in passes:
        for r in results:
            seen.setdefault((r["device"], r["op"], r["case"]), []).append(r)
    rows = []
    for same in seen.values():
        row = {k: same[0][k] for k in ("op", "case", "device", "baseline")}
        ok = [{k: r[k] for k in ("visionops_ms", "baseline_ms", "ratio")} for r in same if "error" not in r]
        if ok:
            for k in ("visionops_ms", "baseline_ms", "ratio"):
                row[k] = statistics.median(p[k] for p in ok)
            row["ratio_min"] = min(p["ratio"] for p in ok)
            row["ratio_max"] = max(p["ratio"] for p in ok)
        if ok and "bound_ms" in same[0]:
            row["bound_ms"] = same[0]["bound_ms"]
            row["of_bound"] = row["bound_ms"] / row["visionops_ms"]
        row["passes"] = ok
        errors = [r["error"] for r in same if "error" in r]
        if errors:
            row["error"] = errors[0] + (f" (in {len(errors)} of {len(same)} passes)" if len(same) > 1 else "")
        rows.append(row)
    return rows


def _ratio_range(r: dict) -> str:
    return f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x"


def format_table(results: List[dict]) -> str:
    """Columns as wide as their longest entry, numbers aligned on the right; a range column (min-max of the ratio)
    when a row comes from several passes."""
    ranged = any(len(r.get("passes", ())) > 1 for r in results)
    bounded = any("bound_ms" in r for r in results)
    header = ["op", "case", "device", "visionops", "baseline", "ratio"] + (["range"] if ranged else [])
    header += ["bound", "bound/time"] if bounded else []
    rows = []
    for r in results:
        row = [r["op"], r["case"], r["device"]]
        if "error" in r:  # no timing columns: the message runs on after the device
            rows.append(row + ["ERROR " + r["error"]])
            continue
        row += [f"{r['visionops_ms']:.3f}ms", f"{r['baseline_ms']:.3f}ms", f"{r['ratio']:.2f}x"]
        row += [_ratio_range(r) if "ratio_min" in r else ""] if ranged else []
        if bounded:
            row += [f"{r['bound_ms']:.3f}ms", f"{r['of_bound']:.0%}"] if "bound_ms" in r else ["", ""]
        rows.append(row)
    width = [
        max([len(h)] + [len(row[i]) for row in rows if i < 3 or len(row) == len(header)]) for i, h in enumerate(header)
    ]

    def line(cells):
        if len(cells) < len(header):  # an error row
            return "  ".join([c.ljust(w) for c, w in zip(cells[:3], width)] + cells[3:])
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, width))).rstrip()

    lines = [line(header)]
    return "\n".join(lines + ["-" * len(lines[0])] + [line(row) for row in rows])


def save_json(results: List[dict], path: str, devices: dict, threads: int, repeat: int = 1, machine=None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "devices": devices,
        "threads": threads,
        "repeat": repeat,
        "bound_rates": dataclasses.asdict(machine) if machine is not None else None,
        "results": results,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def _fit_xlim(fig, ax, notes, lo: float, hi: float) -> None:
    """Widen the log x-range until every value label sits inside the axes: a label reaches a fixed number of pixels
    beyond its bar, so the range needed depends on the axes' width in pixels, known only once laid out."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    reach = [(math.log10(anchor), side, t.get_window_extent(renderer).width + 16) for t, anchor, side in notes]
    left, right = math.log10(lo), math.log10(hi)
    for _ in range(20):
        ax.set_xlim(10**left, 10**right)
        fig.tight_layout()
        px = ax.get_window_extent(renderer).width / (right - left)  # pixels per decade
        need_left = min([left] + [a - w / px for a, side, w in reach if side < 0])
        need_right = max([right] + [a + w / px for a, side, w in reach if side > 0])
        if need_left >= left - 1e-3 and need_right <= right + 1e-3:
            return
        left, right = need_left, need_right


def plot(results: List[dict], title: str):
    """A matplotlib figure of the ratios: horizontal bars on a log scale drawn from the 1x line (left: slower than the
    baseline, right: faster), the min-max range over passes as whiskers. None without matplotlib or any ratio."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        return None
    ok = [r for r in results if "ratio" in r]
    if not ok:
        return None
    several_devices = len({r["device"] for r in ok}) > 1
    labels = [f"{r['op']} {r['case']}" + (f" ({r['device']})" if several_devices else "") for r in ok]
    ratio = [r["ratio"] for r in ok]
    low = [r.get("ratio_min", r["ratio"]) for r in ok]
    high = [r.get("ratio_max", r["ratio"]) for r in ok]
    ranged = any(len(r.get("passes", ())) > 1 for r in ok)

    fig, ax = plt.subplots(figsize=(10, 0.32 * len(ok) + 1.4))
    y = range(len(ok))
    colors = ["tab:green" if v >= 1.0 else "tab:red" for v in ratio]
    ax.barh(y, [abs(v - 1.0) for v in ratio], left=[min(v, 1.0) for v in ratio], color=colors, height=0.7)
    if ranged:
        ax.errorbar(
            ratio,
            y,
            xerr=[[v - a for v, a in zip(ratio, low)], [b - v for v, b in zip(ratio, high)]],
            fmt="none",
            ecolor="black",
            elinewidth=0.8,
            capsize=2,
        )
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1, zorder=0)
    notes = []
    for i, (v, a, b) in enumerate(zip(ratio, low, high)):
        side = 1 if v >= 1.0 else -1  # outside the bar's far end, away from the 1x line
        anchor = b if side > 0 else a
        text = f"{v:.2f}x" if v < 10 else f"{v:.1f}x" if v < 100 else f"{v:.0f}x"
        note = ax.annotate(
            text,
            (anchor, i),
            xytext=(4 * side, 0),
            textcoords="offset points",
            ha="left" if side > 0 else "right",
            va="center",
            fontsize=8,
        )
        notes.append((note, anchor, side))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_yticks(list(y), labels, fontsize=8)
    fig.canvas.draw()  # the case names take what they need; the bars keep about 6.5 inches whatever their length
    names = max(t.get_window_extent().width for t in ax.get_yticklabels()) / fig.dpi
    fig.set_size_inches(names + 7.0, fig.get_size_inches()[1])
    ax.set_ylim(len(ok) - 0.4, -0.6)
    ax.set_xlabel("speed-up over the baseline (baseline time / visionops time), log scale")
    if ranged:
        passes = max(len(r["passes"]) for r in ok)
        title += f"\nmedian of {passes} passes; whiskers: lowest and highest pass"
    ax.set_title(title, fontsize=9)
    _fit_xlim(fig, ax, notes, min(low + [1.0]) / 1.25, max(high + [1.0]) * 1.25)
    decades = math.log10(ax.get_xlim()[1] / ax.get_xlim()[0])
    ax.xaxis.set_major_locator(
        LogLocator(subs=(1.0, 2.0, 5.0) if decades < 2.5 else (1.0, 3.0) if decades < 4 else (1.0,))
    )
    return fig


def save_plot(results: List[dict], path: str, title: str) -> bool:
    """The plot of `plot` as a PNG; False when there is nothing to plot or no matplotlib."""
    fig = plot(results, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)  # tight: every label inside the image
    plt.close(fig)
    return True
