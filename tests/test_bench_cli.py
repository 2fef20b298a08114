"""The benchmark runner's command line, table, passes and plot (no benchmark is timed at length here)."""

import json
import logging
import os
import re
import shlex
import subprocess
import sys

import pytest

from visionops.bench import runner
from visionops.bench.__main__ import EXAMPLES, build_parser, main
from visionops.bench.cases import all_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "python -m visionops.bench"


def _selected(argv):
    """The cases a command line selects on the devices it asks for, GPU or not (as the runner selects them)."""
    args = build_parser().parse_args(argv)
    devices = ["cpu", "cuda"] if args.device in (None, "all") else [args.device]
    return [c for d in devices for c in runner.select(all_cases(), d, args.quick, args.filter)]


def _help_examples():
    text = build_parser().format_help()
    commands = [m.group(1) for m in re.finditer(rf"^ +{COMMAND} (.*?)(?: {{2,}}|$)", text, re.MULTILINE)]
    filter_help = next(a.help for a in build_parser()._actions if a.dest == "filter")
    commands += ["--filter " + shlex.quote(p) for p in re.findall(r"'([^']+)'", filter_help.split("e.g.", 1)[1])]
    return commands


def _readme_examples():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    found = []
    for m in re.finditer(rf"{COMMAND}([^`\n)]*)", text):  # up to the end of the code span, line or parenthesis
        line = m.group(1).split("&&")[0].split("#")[0]
        if "[" not in line and "--help" not in line:  # not the synopsis or a pointer to the help
            found.append(line.strip())
    return found


def test_help_lists_examples():
    examples = _help_examples()
    assert len(examples) >= len(EXAMPLES) + 2  # the epilog's lines and the --filter help's two patterns
    assert any("roi_align.*bwd" in e for e in examples)


@pytest.mark.parametrize("source", ["help", "readme"])
def test_documented_examples_select_cases(source):
    examples = _help_examples() if source == "help" else _readme_examples()
    assert examples, f"no `{COMMAND}` example found in the {source}"
    for example in examples:
        assert _selected(shlex.split(example)), f"`{COMMAND} {example}` ({source}) selects no benchmark case"


def test_unmatched_filter_says_so(capsys):
    assert main(["--device", "cpu", "--filter", "roi_align.*backward", "--no-plot"]) == 1
    assert "no benchmark case matches --filter 'roi_align.*backward'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--threads", "0"]])
def test_bad_counts_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert argv[0] in capsys.readouterr().err


def test_import_is_quiet_and_leaves_logging_alone():
    # torch.utils.benchmark imports torch.utils.cpp_extension, which logs a guessed CUDA_HOME when no CUDA runtime
    # is found; the runner builds nothing, so that line must not reach its output.
    code = "import logging, visionops.bench.runner; print(logging.getLogger('torch.utils.cpp_extension').level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "CUDA_HOME" not in out.stderr + out.stdout
    assert out.stdout.strip() == str(logging.NOTSET)


def _row(op, case, *ratios, device="cpu"):
    return [{"op": op, "case": case, "device": device, "baseline": "b", "visionops_ms": 1.0, "baseline_ms": r,
             "ratio": r} for r in ratios]  # fmt: skip


def test_combine_median_range_and_passes():
    passes = [
        _row("nms", "1k", 2.0) + _row("roi_align", "fwd", 1.0),
        _row("nms", "1k", 5.0) + [{"op": "roi_align", "case": "fwd", "device": "cpu", "baseline": "b", "error": "E"}],
        _row("nms", "1k", 3.0) + _row("roi_align", "fwd", 0.5),
    ]
    nms, roi = runner.combine(passes)
    assert (nms["ratio"], nms["ratio_min"], nms["ratio_max"]) == (3.0, 2.0, 5.0)
    assert [p["ratio"] for p in nms["passes"]] == [2.0, 5.0, 3.0]
    assert roi["ratio"] == 0.75 and len(roi["passes"]) == 2
    assert roi["error"] == "E (in 1 of 3 passes)"


def test_table_columns_fit_their_content():
    long_op = "multi_scale_roi_align_with_a_very_long_name"
    results = runner.combine([_row("nms", "1k", 2.0) + _row(long_op, "fwd+bwd " + "x" * 60, 123.456)] * 2)
    results.append({"op": "nms", "case": "broken", "device": "cpu", "baseline": "b", "error": "ValueError: bad"})
    lines = runner.format_table(results).splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:]
    assert set(rule) == {"-"} and len(rule) == len(header)
    for column in ("case", "device", "visionops", "baseline"):  # each starts past the longest entry before it
        assert header.index(column) > max(len(r.split("  ")[0]) for r in rows)
    ends = {len(r) for r in rows[:2]}
    assert ends == {len(header)}, "the timed rows' last column ends under the header's"
    assert rows[0].index("cpu") == rows[1].index("cpu") == rows[2].index("cpu") == header.index("device")
    assert "range" in header and "123.46-123.46x" in rows[1]
    assert rows[2].endswith("ERROR ValueError: bad")


def test_main_repeat_writes_median_range_and_passes(tmp_path, capsys):
    argv = ["--device", "cpu", "--filter", "^box_iou 1k x 1k$", "--repeat", "2", "--min-time", "0.001"]
    assert main(argv + ["--threads", "1", "--no-plot", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "median of 2 passes" in out and "range" in out
    (path,) = tmp_path.glob("bench-cpu-*.json")
    payload = json.loads(path.read_text())
    assert payload["repeat"] == 2
    (row,) = payload["results"]
    assert len(row["passes"]) == 2
    assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
    assert sorted(p["ratio"] for p in row["passes"]) == [row["ratio_min"], row["ratio_max"]]


def test_sigterm_keeps_the_cases_timed_so_far(tmp_path, capsys, monkeypatch):
    """`timeout` (SIGTERM) in the middle of a run: the cases already timed are still printed and saved."""
    import signal

    real_run, calls = runner.run, []

    def run(cases, *args, **kwargs):
        calls.append(cases[0].name)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_run(cases, *args, **kwargs)

    monkeypatch.setattr(runner, "run", run)
    argv = ["--device", "cpu", "--filter", "^box_iou ", "--min-time", "0.001", "--threads", "1", "--no-plot"]
    assert main(argv + ["--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "stopped by SIGTERM after 1 of" in captured.err
    (path,) = tmp_path.glob("bench-cpu-*.json")
    assert [r["case"] for r in json.loads(path.read_text())["results"]] == calls[:1]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("name", ["cpu-Intel-Xeon-20261201-conv-models-mcnms-bench.json", "three passes"])
def test_plot_labels_inside_and_off_the_1x_line(name, tmp_path):
    pytest.importorskip("matplotlib")
    results_dir = os.path.join(ROOT, "benchmarks", "results")
    if name == "three passes":
        runs = sorted(
            f for f in os.listdir(results_dir) if re.fullmatch(r"cpu-Intel-Xeon-20261201-run\d-bench.json", f)
        )
        results = runner.combine([json.load(open(os.path.join(results_dir, f)))["results"] for f in runs])
    else:
        results = json.load(open(os.path.join(results_dir, name)))["results"]
    fig = runner.plot(results, "a CPU (2 threads)")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    one = ax.transData.transform((1.0, 0.0))[0]  # the 1x line, in pixels
    notes = [t for t in ax.texts if t.get_text().endswith("x")]
    assert len(notes) == len([r for r in results if "ratio" in r])
    for note in notes:
        box = note.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, f"label {note.get_text()} leaves the axes"
        assert not box.x0 < one < box.x1, f"label {note.get_text()} crosses the 1x line"
    ticks = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
    ticks = [b for b in ticks if frame.x0 - 1 <= (b.x0 + b.x1) / 2 <= frame.x1 + 1]
    assert all(a.x1 < b.x0 for a, b in zip(ticks, ticks[1:])), "x tick labels overlap"
    path = tmp_path / "plot.png"
    assert runner.save_plot(results, str(path), "a CPU (2 threads)") and path.stat().st_size > 0
