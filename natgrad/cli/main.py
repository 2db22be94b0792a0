"""The ``natgrad`` command: ``natgrad demo``, ``natgrad report FISHER_FILE...``, ``natgrad metrics``.

Errors (missing files, bad arguments, unwritable directories, missing optional
packages) print one line ``natgrad: error: ...`` on stderr and exit with status 2
(bad arguments) or 1 (anything else), without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import NoReturn

from natgrad._version import __version__

__all__ = ["main"]


class CommandError(Exception):
    """An error to report in one line (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        print(f"natgrad: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _fail(message: str) -> None:
    """Print ``natgrad: error: <message>`` as one line on stderr."""
    print("natgrad: error: " + " ".join(message.split()), file=sys.stderr)


def _writable_dir(path: str) -> str:
    """Create ``path`` if needed and check that files can be written in it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".natgrad-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CommandError(
            f"cannot write to output directory {path!r}: {reason}; pass --out with a "
            "writable directory"
        ) from None
    return path


def _refuse_overwrite(out: str, names: Iterable[str], force: bool) -> None:
    """Raise unless ``--force`` when any of ``names`` already exists in ``out``."""
    if force:
        return
    existing = sorted(n for n in names if os.path.lexists(os.path.join(out, n)))
    if existing:
        raise CommandError(
            f"output directory {out!r} already holds {', '.join(existing)}; pass --force to "
            "overwrite them, or --out with another directory"
        )


def _cmd_metrics(args: argparse.Namespace) -> int:
    import json

    from natgrad.metrics import registry
    from natgrad.metrics.context import NEEDS

    infos = [registry.describe(n) for n in registry.names()]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    width = max(len(i["name"]) for i in infos)
    sig_w = max(len(i["signature"]) for i in infos)
    print(f"{'metric':<{width}}  {'signature':<{sig_w}}  needs")
    for i in infos:
        needs = ", ".join(i["needs"]) or "-"
        flag = " [mutates]" if i["mutates"] else ""
        print(f"{i['name']:<{width}}  {i['signature']:<{sig_w}}  {needs}{flag}")
        if args.verbose:
            print(f"{'':<{width}}  {i['description']}")
    print(f"{len(infos)} metrics. Needs: " + "; ".join(f"{k} = {v}" for k, v in NEEDS.items()))
    return 0


def _refuse_other_kind(path: str) -> None:
    """Raise a CommandError when ``path`` is a natgrad file of a kind other than a
    diagonal Fisher (e.g. a K-FAC curvature), saying what ``report`` reads instead."""
    from natgrad.curvature.diagonal import DiagonalFisher
    from natgrad.curvature.protocol import CURVATURE_KINDS
    from natgrad.engine.files import read_format

    found = read_format(path, "Fisher")
    if found is None or not found.startswith("natgrad.") or found == DiagonalFisher.file_format:
        return  # DiagonalFisher.load verifies it (and names a foreign file)
    kinds = sorted(k for k, c in CURVATURE_KINDS.items() if c.file_format == found)
    what = f"a curvature of kind {'/'.join(kinds)} ({found})" if kinds else f"a {found} file"
    fix = (
        "save its diagonal as a Fisher file and pass that: in Python, "
        "natgrad.DiagonalFisher(curvature.diagonal(), curvature.n_samples).save(path)"
        if kinds
        else "pass a Fisher file (natgrad.estimate_fisher(model, data).save(path) in Python)"
    )
    raise CommandError(
        f"{path!r} holds {what}, but natgrad report reads diagonal Fisher files only (written "
        f"by DiagonalFisher.save); {fix}"
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from natgrad.cli.demo.fisher_report import OUTPUTS, fisher_report
    from natgrad.curvature.diagonal import DiagonalFisher

    fishers = {}
    seen: dict[tuple[int, int], str] = {}
    for path in args.files:
        if not os.path.isfile(path):
            raise CommandError(f"no such Fisher file: {path!r}")
        # one file given twice (the same path, or two paths to one file) is refused: its
        # second section and its comparison with itself would say nothing, and the
        # usual cause is an overlapping glob or a typo for another file
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            first = seen[key]
            same = (
                f"{path!r} is given twice"
                if first == path
                else f"{first!r} and {path!r} are the same file"
            )
            raise CommandError(
                f"{same}; natgrad report describes and compares different Fisher files: "
                "pass each file once"
            )
        seen[key] = path
        try:
            _refuse_other_kind(path)
            fishers[path] = DiagonalFisher.load(path)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    out = _writable_dir(args.out)
    _refuse_overwrite(out, OUTPUTS, args.force)
    result = fisher_report(fishers, out, top=args.top)
    print(result.text)
    print(f"wrote {', '.join(result.files)}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    out = _writable_dir(args.out)
    from natgrad.cli.demo.common import OUTPUTS

    _refuse_overwrite(out, OUTPUTS, args.force)
    for pkg, pip in (("mnist1d", "mnist1d"), ("matplotlib", "matplotlib")):
        try:
            __import__(pkg)
        except ImportError:
            raise CommandError(
                f"the demo needs {pkg}: pip install {pip} (or pip install 'natgrad[demo]')"
            ) from None
    from natgrad.cli.demo import run_demo

    result = run_demo(out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print(result.table)
    print(f"\nReport: {os.path.join(out, 'report.md')} ({result.seconds:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``natgrad`` command."""
    p = _Parser(
        prog="natgrad",
        description="Fisher information from exact per-sample gradients, and its uses.",
    )
    p.add_argument("--version", action="version", version=f"natgrad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    d = sub.add_parser("demo", help="run every use of the Fisher on MNIST-1D; write a report")
    d.add_argument(
        "--out", default="natgrad-demo", help="output directory (default ./natgrad-demo)"
    )
    d.add_argument("--quick", action="store_true", help="small and fast (about 17 s of CPU time; used by CI)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--no-progress", action="store_true", help="no step lines on stderr")
    d.add_argument(
        "--force", action="store_true", help="overwrite files from an earlier run in --out"
    )
    d.set_defaults(func=_cmd_demo)
    r = sub.add_parser(
        "report", help="per-layer mass, top coordinates and similarity of Fisher files"
    )
    r.add_argument(
        "files", nargs="+", metavar="FISHER_FILE", help="files written by DiagonalFisher.save (each once)"
    )
    r.add_argument(
        "--out", default="natgrad-report", help="output directory (default ./natgrad-report)"
    )
    r.add_argument("--top", type=int, default=10, help="top coordinates to list (default 10)")
    r.add_argument(
        "--force", action="store_true", help="overwrite files from an earlier run in --out"
    )
    r.set_defaults(func=_cmd_report)
    m = sub.add_parser(
        "metrics", help="list the registered metrics, their signature types and needs"
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument("-v", "--verbose", action="store_true", help="print each metric's description")
    m.set_defaults(func=_cmd_metrics)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``natgrad`` command; returns the exit status.

    Example:
        >>> main(["metrics"])  # doctest: +ELLIPSIS
        metric ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "top", 1) < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if getattr(args, "seed", 0) < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        status: int = args.func(args)
        return status
    except CommandError as exc:
        _fail(str(exc))
        return 1
    except BrokenPipeError:
        # the reader closed stdout (`natgrad metrics --json | head`): nothing to report;
        # stdout goes to devnull so that the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ImportError, OSError, ValueError) as exc:
        _fail(f"{type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        print("natgrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
