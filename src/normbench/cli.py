"""`normbench train | settings | studies | data | aggregate | numerics | bench | report | warm`: every workflow step is
one of these commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import normbench


def _train(args: argparse.Namespace) -> None:
    from normbench.cells import make_settings
    from normbench.config import load_settings_file, parse_assignments
    from normbench.distributed import under_torchrun
    from normbench.train import run_cell

    values = load_settings_file(args.from_file) if args.from_file else {}
    values.update(parse_assignments(args.set))
    if not under_torchrun():  # an outer torchrun (several nodes) places its own workers
        from normbench.devices import assign_gpus

        # Before anything may start CUDA, a plugin's import (in the check below) included.
        world_size = values.get("world_size", 1)
        assign_gpus(world_size if isinstance(world_size, int) else 1, values.get("device", "auto"), args.gpu_share)
    settings = make_settings(values)
    summary = run_cell(settings, args.out, args.threads, args.timeout, args.time_limit, args.force)
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return
    if summary["diverged"]:
        state = "diverged: " + summary["diverged_reason"]
    elif summary["failed"]:
        state = "failed: " + summary["failure_reason"]
    else:  # a cell out of time before its first evaluation has no accuracy yet
        accuracy = summary["final_test_acc"]
        state = f"final test acc {accuracy:.4f}" if accuracy is not None else "not evaluated yet"
        state += f" (timed out: {summary['timed_out_reason']})" if summary["timed_out"] else ""
    speed = summary["train_samples_per_s"]
    print(f"{args.out}: {state}" + (f", {speed:.0f} samples/s" if speed is not None else ""))


def _settings(args: argparse.Namespace) -> None:
    from normbench.config import settings_help

    rows = settings_help()
    width = max(len(name) for name, _, _ in rows)
    for name, default, description in rows:
        print(f"{name:<{width}}  default {default}" + (f"\n{'':<{width}}  {description}" if description else ""))


def _studies(args: argparse.Namespace) -> None:
    from normbench.cells import studies_table
    from normbench.config import SettingsError, load_settings_file

    config = load_settings_file(args.config)
    if not isinstance(config.get("studies"), dict):
        raise SettingsError(f"{args.config} has no `studies` mapping: `normbench studies` reads a workflow config "
                            f"such as config/config.yaml, not a cell's settings")
    print(studies_table(config), end="")


def _data(args: argparse.Namespace) -> None:
    from normbench.data import fetch

    written = fetch(args.dataset, args.root, args.download)
    print(f"{args.dataset} ready under {args.root} (tensor cache {'written' if written else 'up to date'})")


def _aggregate(args: argparse.Namespace) -> None:
    from normbench.config import SettingsError
    from normbench.results import aggregate, write_table

    root = Path(args.runs_root).resolve()
    for summary in args.summaries:
        if not Path(summary).resolve().is_relative_to(root):
            raise SettingsError(f"{summary} is not under --runs-root {args.runs_root}: cells are read as "
                                f"<runs-root>/<study>/<cell>/summary.json; pass the folder that holds them")
    tables = aggregate(args.summaries, args.runs_root, args.job_benchmarks)
    for name, table in tables.items():
        write_table(table, Path(args.out) / f"{name}.csv")
    print(", ".join(f"{len(table)} rows in {name}.csv" for name, table in tables.items()), "->", args.out)


def _numerics(args: argparse.Namespace) -> None:
    from normbench.numerics import output_errors
    from normbench.results import write_table
    from normbench.train import resolve_device

    device = resolve_device(args.device)
    write_table(output_errors(device=device), args.out)
    print(f"norm layer errors against float64 on {device} -> {args.out}")


def _bench(args: argparse.Namespace) -> None:
    import json

    from normbench.bench import run
    from normbench.config import SettingsError

    try:
        fold = json.loads(args.fold)
    except json.JSONDecodeError as error:
        raise SettingsError(f"--fold: not JSON ({error}); give {{study: {{setting: value, ...}}}}") from None
    if not isinstance(fold, dict) or not all(isinstance(values, dict) for values in fold.values()):
        raise SettingsError("--fold: give a JSON object of studies, each mapping settings to values")
    run(Path(args.out), args.max_time, args.threads, args.device, args.repeats, fold)
    print(f"norm micro-benchmarks -> {args.out}")


def _report(args: argparse.Namespace) -> None:
    import json

    from normbench.config import SettingsError, load_settings_file
    from normbench.report import render_report

    if args.config.lstrip().startswith("{"):
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as error:
            raise SettingsError(f"--config: not valid JSON ({error.msg} at character {error.pos}); "
                                f"give the workflow config as JSON text or as a file path") from None
    else:
        config = load_settings_file(args.config)
    render_report(Path(args.tables), config, Path(args.out), Path(args.figures),
                  Path(args.bench) if args.bench else None, Path(args.invocation) if args.invocation else None,
                  args.jobs)
    print(f"report -> {args.out}")


def _archive(args: argparse.Namespace) -> None:
    from normbench.runs import archive

    packed = archive(Path(args.results), Path(args.out))
    print(f"{len(packed)} files ({', '.join(packed)}) -> {args.out}")


def _record(args: argparse.Namespace) -> None:
    from normbench.runs import record_run

    print(f"recorded -> {record_run(Path(args.results), Path(args.out), Path(args.bench) if args.bench else None)}")


def _compare(args: argparse.Namespace) -> None:
    from normbench.report.compare import render_compare
    from normbench.runs import load_run

    from normbench.config import SettingsError

    if len(args.runs) < 2:
        raise SettingsError("compare needs at least two runs: the baseline first, then the runs set beside it")
    runs = [load_run(path) for path in args.runs]
    counts = render_compare(runs, Path(args.out), Path(args.csv) if args.csv else None)
    print(", ".join(f"{count} {what}" for what, count in counts.items()), "->", args.out)


def _warm(args: argparse.Namespace) -> None:
    from normbench.warm import serve

    serve(args.socket, main)


def _above_zero(kind: type, or_zero: bool = False) -> Callable[[str], Any]:
    """An argparse type for a count or a duration: a number above zero (`or_zero`: or zero), refused with the
    option's name."""
    def parse(text: str):
        value = kind(text)  # a ValueError: argparse says "invalid int value" or "invalid float value"
        if not (value >= 0 if or_zero else value > 0):  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is not {'0 or more' if or_zero else 'above 0'}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normbench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"normbench {normbench.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train one cell into a folder (resumes if interrupted)",
        description="Train one cell into a folder; an interrupted cell resumes from its checkpoint. "
                    "`normbench settings` lists every setting with its default and meaning.")
    train.add_argument("--out", required=True, help="the cell folder")
    train.add_argument("--from", dest="from_file", help="start from a settings file, e.g. a cell's config.json")
    train.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="settings, e.g. norm=gn batch_size=4 (repeatable; each setting at most once; "
                            "they override --from)")
    train.add_argument("--force", action="store_true",
                       help="replace a cell of other settings that --out already holds")
    train.add_argument("--threads", type=_above_zero(int), help="CPU threads for the whole cell, shared by its workers "
                       "(an execution setting: not recorded in config.json)")
    train.add_argument("--timeout", type=_above_zero(float), default=300.0,
                       help="seconds any collective may wait before a hung worker fails the cell (default 300)")
    train.add_argument("--time-limit", type=_above_zero(float, or_zero=True), metavar="S",
                       help="seconds after which the cell stops at its next sync point and is recorded as timed out "
                            "(resumable with a longer limit)")
    train.add_argument("--gpu-share", type=_above_zero(int), default=1, metavar="K",
                       help="under the workflow on a GPU machine: share each GPU with up to K-1 other cells "
                            "(packing; the cell's step times then count nowhere); default 1, a GPU of its own")
    train.set_defaults(run=_train)

    settings = commands.add_parser("settings", help="list every setting of a cell with its default and meaning")
    settings.set_defaults(run=_settings)

    studies = commands.add_parser("studies", help="the table of a workflow config's studies (Markdown), "
                                  "as the README shows it")
    studies.add_argument("config", nargs="?", default="config/config.yaml")
    studies.set_defaults(run=_studies)

    data = commands.add_parser("data", help="make a dataset loadable under the data root")
    data.add_argument("dataset", choices=["fashion_mnist", "cifar10"])
    data.add_argument("--root", default="data")
    data.add_argument("--download", action="store_true", help="use torchvision's download (needs the internet)")
    data.set_defaults(run=_data)

    agg = commands.add_parser("aggregate", help="cell folders -> tidy tables cells.csv, curves.csv, probes.csv")
    agg.add_argument("summaries", nargs="+", help="the cells' summary.json files")
    agg.add_argument("--runs-root", default="results/runs", help="the folder holding <study>/<cell>/")
    agg.add_argument("--job-benchmarks", help="Snakemake's benchmark records of the train jobs "
                     "(<study>/<cell>.tsv), for each cell's whole job time")
    agg.add_argument("--out", default="results/tables")
    agg.set_defaults(run=_aggregate)

    numerics = commands.add_parser("numerics", help="each norm layer's error against float64, per dtype and mean offset")
    numerics.add_argument("--out", default="results/tables/numerics.csv")
    numerics.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                          help="where the layers run (default auto: CUDA where there is one)")
    numerics.set_defaults(run=_numerics)

    bench = commands.add_parser("bench", help="micro-benchmarks of the norm layers (pytest-benchmark JSON)")
    bench.add_argument("--out", default="results/bench/norms.json")
    bench.add_argument("--max-time", type=_above_zero(float), default=0.2,
                       help="seconds of timing rounds per case and repeat (default 0.2)")
    bench.add_argument("--threads", type=_above_zero(int), help="CPU threads (default: torch's)")
    bench.add_argument("--repeats", type=_above_zero(int), default=5,
                       help="sessions, each in a process of its own; intervals are taken over them (default 5)")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where the layers run (default auto: CUDA where there is one)")
    bench.add_argument("--fold", default="{}", metavar="JSON",
                       help='time inference with BN folded and not (C11) for each study\'s model, e.g. '
                            '\'{"inference": {"model": "resnet", "depth": 8}}\' (default: none)')
    bench.set_defaults(run=_bench)

    report = commands.add_parser("report", help="tables -> claim verdicts and one self-contained HTML report")
    report.add_argument("--tables", default="results/tables")
    report.add_argument("--config", default="{}",
                        help="the workflow config (studies with their claims, benchmarks): JSON text, or the path "
                             "of a YAML or JSON file")
    report.add_argument("--bench", help="the micro-benchmarks' JSON (normbench bench)")
    report.add_argument("--invocation", help="the workflow run's record (start time, command), where there is one")
    report.add_argument("--figures", default="reports/figures", help="folder for the figures as PNG files")
    report.add_argument("--out", default="reports/report.html")
    report.add_argument("--jobs", type=_above_zero(int), default=1, help="processes drawing the figures (default 1)")
    report.set_defaults(run=_report)
    pack = commands.add_parser("archive", help="pack a finished run (tables, claims, run.json, report; no weights) "
                                               "into a .tar.gz to share, commit or compare")
    pack.add_argument("results", help="the run's results/ folder (reports/ beside it)")
    pack.add_argument("--out", required=True, help="the archive to write, e.g. run.tar.gz")
    pack.set_defaults(run=_archive)
    record = commands.add_parser("record", help="keep a finished run in the repository (docs/runs/<date>-<device>/): "
                                                "claims, cells, report and run.json, with make bench's speed")
    record.add_argument("results", help="the run's results/ folder (reports/ beside it)")
    record.add_argument("--bench", help="make bench's JSON (results/bench/speed.json): samples/s and overhead ratio")
    record.add_argument("--out", default="docs/runs", help="the folder of recorded runs (default docs/runs)")
    record.set_defaults(run=_record)
    compare = commands.add_parser("compare", help="finished runs side by side: each claim's verdict at each run's "
                                                  "scale, and the cells they share (accuracy, step time)")
    compare.add_argument("runs", nargs="+", metavar="RUN",
                         help="results/ folders of finished runs, or their archives; the first is the baseline")
    compare.add_argument("--out", default="reports/compare.html")
    compare.add_argument("--csv", help="also write the claims comparison as CSV here (and the cells' beside it, "
                                       "as <name>_cells.csv)")
    compare.set_defaults(run=_compare)
    warm = commands.add_parser("warm", help="serve `normbench train` from one process that has imported torch "
                                            "(the workflow starts it; see normbench.warm)")
    warm.add_argument("--socket", required=True, help="Unix socket path to listen on")
    warm.set_defaults(run=_warm)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # before the imports below, which load torch: --help stays quick
    if args.command == "train":
        from normbench.warm import run_warm

        code = run_warm(argv)  # in the workflow's warm server, where one answers
        if code is not None:
            sys.exit(code)

    from normbench.config import SettingsError
    from normbench.data import DatasetMissing
    from normbench.distributed import WorkerFailed
    from normbench.results import UnreadableResult
    from normbench.train import Preempted

    try:
        args.run(args)
    except Preempted as stopped:
        sys.exit(f"normbench: {stopped}")
    except (SettingsError, DatasetMissing, WorkerFailed, UnreadableResult) as error:
        sys.exit(f"normbench: error: {error}")
    except BrokenPipeError:  # output piped into a reader that stopped early (| head): Python's documented recipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except FileNotFoundError as error:  # a path given on the command line that is not there
        sys.exit(f"normbench: error: {error.filename}: no such file; check the path")
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as error:  # a path's kind, rights
        sys.exit(f"normbench: error: {error.filename}: {error.strerror}; check the path")
    except OSError as error:  # the machine's, not the input's: a full disk, a failing network filesystem
        if error.errno is None:
            raise
        sys.exit(f"normbench: error: {error.strerror} ({error.filename or 'writing the results'}); a cell keeps its "
                 f"last checkpoint: fix this and run the same command again")
    except KeyboardInterrupt:
        sys.exit("normbench: interrupted; a cell keeps its last checkpoint: run the same command again to continue")


if __name__ == "__main__":
    main()
