"""The ``attnbench`` command line: subcommands over plain functions that tests call directly.

Heavy imports (torch and the implementations) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """\
examples:
  attnbench list                       what runs on this machine, and why not
  attnbench list 'gpa.*' --format json machine-readable, filtered by a wildcard
  attnbench list --device cuda         availability on another device type
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

    p = sub.add_parser(
        "list",
        help="list registered implementations and whether they run on this device",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter (default: *)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--device", help="device type to check (default: cuda if usable, else cpu)")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
