"""`python -m visionops.bench`: visionops against its baseline (torchvision / PyTorch), one table per device.

CPU by default, plus CUDA when a GPU is available (--device picks). Threads are pinned (default 2: ratios depend on
the thread count and the CPU, which the table names). Each case is checked (visionops and the baseline must agree)
before it is timed; ratio = baseline time / visionops time, so above 1 visionops is faster. Ratios move from run to
run: --repeat N makes N full passes and reports the median ratio and its range. Results go to a JSON file and a PNG
plot of the ratios.
"""

import argparse
import datetime
import os
import signal
import sys

import torch

from visionops.bench import bounds, runner
from visionops.bench.cases import all_cases

# Each line is checked by tests/test_bench_cli.py: its options must parse and select at least one case.
EXAMPLES = [
    ("--quick", "a smoke test: the small cases, short timings"),
    ("--filter nms", "every case whose op or name says NMS (the NMS family, RetinaNet with multiclass NMS)"),
    ("--filter 'roi_align.*bwd'", "the RoIAlign backward cases"),
    ("--filter '^xcorr ' --repeat 3", "the xcorr (SiamFC) cases in 3 passes: median ratio and its range"),
    ("--filter fasterrcnn", "Faster R-CNN end to end, with and without patch_torchvision()"),
    ("--device cuda --filter triton", "the Triton kernels on the GPU"),
]


def build_parser() -> argparse.ArgumentParser:
    width = max(len(cmd) for cmd, _ in EXAMPLES) + len("python -m visionops.bench ")
    epilog = "examples:\n" + "\n".join(
        f"  {('python -m visionops.bench ' + cmd).ljust(width)}  {what}" for cmd, what in EXAMPLES
    )
    parser = argparse.ArgumentParser(
        prog="python -m visionops.bench",
        description=__doc__,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default=None, help="default: cpu, and cuda too when available"
    )
    parser.add_argument("--quick", action="store_true", help="small cases, short timing (a smoke test)")
    parser.add_argument(
        "--filter",
        default="",
        metavar="REGEX",
        help="run the cases whose \"op case\" text matches (case-insensitive search), e.g. 'nms' or 'roi_align.*bwd'",
    )
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="full passes over the cases (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument(
        "--min-time", type=float, default=None, help="seconds of timing per function (default 0.5, 0.05 with --quick)"
    )
    parser.add_argument("--out", default="bench-out", help="folder for the JSON and PNG results (default bench-out)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG (no matplotlib needed)")
    return parser


class _Stopped(BaseException):  # not caught by the per-case error handling
    pass


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")

    devices = ["cpu", "cuda"] if args.device in (None, "all") else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: no CUDA device is available")
        devices.remove("cuda")
    torch.set_num_threads(args.threads)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5)

    plan = {d: runner.select(all_cases(), d, args.quick, args.filter) for d in devices}
    total = sum(len(v) for v in plan.values())
    if total == 0:
        print(f"no benchmark case matches --filter {args.filter!r} on {', '.join(devices)}", file=sys.stderr)
        return 1
    try:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (CI logs)
        progress = tqdm(total=total * args.repeat, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)
    except ImportError:
        progress = None
    machine = None
    if "cuda" in plan and any("work" in c.tags for c in plan["cuda"]):
        machine = bounds.measure(torch.device("cuda"))  # the bounds' rates, measured in this run
    passes = []
    stopped = False
    # SIGTERM (e.g. `timeout`) ends the run early but still reports and saves the cases timed so far
    signal.signal(signal.SIGTERM, _stop)
    try:
        for _ in range(args.repeat):
            passes.append([])
            for device, cases in plan.items():
                for case in cases:
                    rates = machine if device == "cuda" else None
                    passes[-1] += runner.run([case], device, args.threads, min_time, progress, rates)
    except _Stopped:
        stopped = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if progress is not None:
        progress.close()
    results = runner.combine([p for p in passes if p])
    if stopped:
        print(f"stopped by SIGTERM after {len(results)} of {total} cases", file=sys.stderr)

    names = {d: runner.device_name(d) for d in devices}
    summary = "median" if args.repeat == 1 else f"median of {args.repeat} passes; range: lowest-highest pass"
    print(f"visionops benchmark: ratio = baseline time / visionops time ({summary}); {', '.join(names.values())}")
    if machine is not None:
        print(f"bound = the least time the case's bytes, FLOPs and launches allow at {machine.describe()}")
    print(runner.format_table(results))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "-".join(devices) + ("-quick" if args.quick else "")
    json_path = os.path.join(args.out, f"bench-{tag}-{stamp}.json")
    runner.save_json(results, json_path, names, args.threads, args.repeat, machine)
    print(f"results: {json_path}")
    if not args.no_plot:
        png = json_path[:-5] + ".png"
        if runner.save_plot(results, png, "; ".join(names.values())):
            print(f"plot: {png}")
    return 1 if stopped or any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
