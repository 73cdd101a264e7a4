"""The ``attnbench`` command line: subcommands over plain functions that tests call directly.

Heavy imports (torch and the implementations) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

EXAMPLES = """\
examples:
  attnbench list                                   what runs here, and why not
  attnbench list 'gpa.*' --format json             machine-readable, filtered by a wildcard
  attnbench validate suites/*.yaml                 check suites without running them
  attnbench run suites/quick.yaml --out /tmp/ab    measure; rows in /tmp/ab/quick-<device>.jsonl
  attnbench run suites/micro.yaml --resume         continue an interrupted run
  attnbench run suites/micro.yaml --shard 2/4      the second of four shares of the cases
  attnbench report --results results/raw --out results
                                                   tables, plots and report.md from the rows
"""


def default_device() -> str:
    """ "cuda" when a CUDA device is usable, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def impl_table(pattern: str = "*", device: str | None = None) -> list[dict]:
    """One record per registered implementation: name, family, backend, available, reasons."""
    from attnbench import registry

    device = device or default_device()
    rows = []
    for name in registry.list_impls(pattern):
        cls = registry.get(name)
        reasons = cls.availability(device)
        rows.append(
            {
                "name": name,
                "family": cls.family,
                "backend": cls.backend,
                "available": not reasons,
                "reasons": reasons,
            }
        )
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table (lists joined by '; ', booleans as yes/no)."""

    def cell(value) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, list):
            return "; ".join(value) or "-"
        return str(value)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    rows = impl_table(args.pattern, device)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(f"attention implementations (device: {device})")
        print(format_table(rows, ["name", "family", "backend", "available", "reasons"]))
    if not rows:
        print(f"no implementation matches {args.pattern!r}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from attnbench.suite import SuiteError, load_suites

    failed = 0
    for file in args.files:
        try:
            suites = load_suites(file)
        except SuiteError as err:
            failed += 1
            print(err, file=sys.stderr)
        else:
            names = ", ".join(f"{s.kind} suite {s.name!r}" for s in suites)
            print(f"{file}: ok ({names})")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from attnbench.harness import is_main_process, parse_shard, run_suite
    from attnbench.suite import SuiteError, load_suites

    try:
        suites = load_suites(args.suite)
        shard = parse_shard(args.shard)
    except (SuiteError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    for suite in suites:
        try:
            path, rows = run_suite(
                suite,
                args.out,
                resume=args.resume,
                overwrite=args.overwrite,
                retry_errors=args.retry_errors,
                shard=shard,
                device=args.device,
                progress=not args.no_progress,
            )
        except ValueError as err:
            print(err, file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            print(
                f"\ninterrupted: every finished case is in {args.out}; run again with --resume",
                file=sys.stderr,
            )
            return exit_code(err)
        if is_main_process():
            print_summary(suite, path, len(rows), args.device)
    return 0


def print_summary(suite, path, new_rows: int, device: str | None) -> None:
    """The suite's rows in its results file as a table; a note on rows of other
    configurations of the suite that share the file."""
    from attnbench.harness import case_ids, resolve_device
    from attnbench.kinds import KINDS
    from attnbench.results import read_rows

    ids = case_ids(suite, resolve_device(device or suite.device))
    every = read_rows([path]) if path.exists() else []  # a shard with no cases writes none
    mine = [r for r in every if r.get("case_id") in ids]
    print(f"\n## {suite.name}\n")
    print(KINDS[suite.kind].summary(mine))
    print(f"\n{new_rows} new rows; all rows in {path}")
    if len(every) > len(mine):
        print(
            f"note: {len(every) - len(mine)} rows in {path} belong to another "
            f"configuration of suite {suite.name!r} (other seeds, parameters, steps or "
            "options); this summary leaves them out",
            file=sys.stderr,
        )


def cmd_report(args: argparse.Namespace) -> int:
    from attnbench.report import write_report
    from attnbench.results import load

    try:
        rows = load(args.results)
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    written = write_report(rows, args.out, plots=not args.no_plots)
    tables = sum(p.suffix == ".md" and p.parent.name == "tables" for p in written)
    plots = sum(p.suffix == ".png" for p in written)
    print(f"{len(rows)} rows -> {tables} tables (Markdown and CSV), {plots} plots in {args.out}")
    print(f"one page: {os.path.join(args.out, 'report.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from attnbench import __version__

    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="Benchmarks for attention layers on images (GPA, exact, Nystrom, Performer).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"attnbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_list_parser(sub)
    p = sub.add_parser("validate", help="check suite files without running anything")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)
    add_run_parser(sub)
    add_report_parser(sub)
    return parser


def subcommand(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the examples."""
    return sub.add_parser(
        name, help=help, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_list_parser(sub) -> None:
    p = subcommand(
        sub, "list", "list registered implementations and whether they run on this device"
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter (default: *)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--device", help="device type to check (default: cuda if usable, else cpu)")
    p.set_defaults(func=cmd_list)


def add_run_parser(sub) -> None:
    p = subcommand(sub, "run", "run a suite, one result row per case")
    p.add_argument("suite", metavar="SUITE", help="a suite file (suites/*.yaml)")
    p.add_argument("--out", default="results/raw", help="directory of the results file")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="skip cases whose rows exist")
    how.add_argument("--overwrite", action="store_true", help="start the results file afresh")
    how.add_argument(
        "--retry-errors",
        action="store_true",
        help="resume, and run again the cases whose rows are errors",
    )
    p.add_argument("--shard", default="1/1", metavar="i/N", help="run the i-th of N shares")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)


def add_report_parser(sub) -> None:
    p = subcommand(sub, "report", "tables (Markdown, CSV) and plots (PNG) from result rows")
    p.add_argument(
        "--results",
        nargs="+",
        default=["results/raw"],
        metavar="PATH",
        help="results files or directories of *.jsonl (default: results/raw)",
    )
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--no-plots", action="store_true", help="tables and report.md only")
    p.set_defaults(func=cmd_report)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run ends the way Ctrl-C ends it: its worker
    processes shut down (the executors' exits wait for them) and finished rows stay."""


def terminate(signum, frame) -> None:
    raise Terminated


def exit_code(err: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (SIGTERM 143, SIGINT 130)."""
    return 143 if isinstance(err, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:  # start-up included: a message, not a traceback
        print("\ninterrupted", file=sys.stderr)
        return exit_code(err)
    finally:
        signal.signal(signal.SIGTERM, previous)
