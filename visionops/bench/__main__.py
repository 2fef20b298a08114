"""`python -m visionops.bench`: visionops against its baseline (torchvision / PyTorch), one table per device.

CPU by default, plus CUDA when a GPU is available (--device picks). Threads are pinned (default 2: ratios depend on
the thread count and the CPU, which the table names). Results go to a JSON file and a PNG plot of the ratios.
"""

import argparse
import datetime
import os
import sys

import torch

from visionops.bench import runner
from visionops.bench.cases import all_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionops.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default=None, help="default: cpu, and cuda too when available"
    )
    parser.add_argument("--quick", action="store_true", help="small cases, short timing (a smoke test)")
    parser.add_argument("--filter", default="", help="regex on 'op case', e.g. 'nms' or 'roi_align.*backward'")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--min-time", type=float, default=None, help="seconds of timing per function")
    parser.add_argument("--out", default="bench-out", help="folder for the JSON and PNG results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

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
        print("no benchmark case matches", file=sys.stderr)
        return 1
    try:
        from tqdm import tqdm

        progress = tqdm(
            total=total, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None
        )  # off when not a TTY
    except ImportError:
        progress = None
    results = []
    for device, cases in plan.items():
        results += runner.run(cases, device, args.threads, min_time, progress)
    if progress is not None:
        progress.close()

    names = {d: runner.device_name(d) for d in devices}
    print(f"visionops benchmark: ratio = baseline time / visionops time (median); {', '.join(names.values())}")
    print(runner.format_table(results))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = "-".join(devices) + ("-quick" if args.quick else "")
    json_path = os.path.join(args.out, f"bench-{tag}-{stamp}.json")
    runner.save_json(results, json_path, names, args.threads)
    print(f"results: {json_path}")
    if not args.no_plot:
        png = json_path[:-5] + ".png"
        if runner.save_plot(results, png, "; ".join(names.values())):
            print(f"plot: {png}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
