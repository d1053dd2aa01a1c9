"""The `memfast` command line. Each subcommand lives in its own module, which
exposes `add_arguments(parser)` and `run(args) -> int`; they are imported only
when used, so `memfast --help` stays fast."""
import argparse
import importlib
import math
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("memfast.demo", "find mislabeled and duplicate samples on the embedded digits data"),
    "report": ("memfast.report", "tables and plots from a saved SampleTracker"),
    "score": ("memfast.score", "score saved checkpoints (eval-mode CSL, gradient norms, curvature) into a tracker"),
    "mat-demo": ("memfast.mat_demo", "memorization-aware training on the paper's spurious-feature setup"),
    "bench": ("memfast.bench", "time memfast.cross_entropy beside PyTorch on this machine"),
    "info": ("memfast.info", "how memfast was built and which backend runs"),
}


def build_parser(load=None):
    parser = argparse.ArgumentParser(prog="memfast", description="Fast memorization measurement and "
                                     "memorization-aware training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load in (name, "all"):
            importlib.import_module(module).add_arguments(p)
    return parser


def _positive(convert, what):
    """An argparse type: convert(text), refused unless > 0 and finite."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


positive_int = _positive(int, "a positive integer")
positive_float = _positive(float, "a positive finite number")


# What a command raises for bad input (files, shapes, values): one line naming the command, not a
# traceback (MEMFAST_DEBUG=1 shows it).
_USER_ERRORS = (ValueError, TypeError, IndexError, KeyError, OSError)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in COMMANDS:
        build_parser().print_help()
        return 0 if name is None and argv in ([], ["-h"], ["--help"]) else 2
    args = build_parser(load=name).parse_args(argv)
    try:
        return int(importlib.import_module(COMMANDS[name][0]).run(args) or 0)
    except _USER_ERRORS as e:
        if os.environ.get("MEMFAST_DEBUG") == "1":
            raise
        raise SystemExit(f"memfast {name}: {e} ({type(e).__name__}; MEMFAST_DEBUG=1 shows the traceback)") from None


if __name__ == "__main__":
    sys.exit(main())
