"""The `lorahub-compeft` command: compress, inspect and export experts, keep a library of them,
and compose them for a new task from a few examples."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from lorahub_compeft.cli import compose, evaluate, experts, library, reproduce
from lorahub_compeft.cli.errors import error_message, stdout_closed

EPILOG = """examples:
  lorahub-compeft compress path/to/peft_adapter_dir -o expert.safetensors --density 0.1 --alpha 1
  lorahub-compeft inspect expert.safetensors
  lorahub-compeft export expert.safetensors -o adapter_dir/
  lorahub-compeft library add ./experts lorahub/flan_t5_large-ag_news_subset path/to/dir
  lorahub-compeft library list ./experts
  lorahub-compeft compose --library ./experts --examples task.jsonl -n 20 --out my_adapter/
  lorahub-compeft download --cache hf-cache          # where there is network
  lorahub-compeft reproduce --cache hf-cache --out runs/table7   # offline
"""



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorahub-compeft", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (or LORAHUB_COMPEFT_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (experts, library, compose, evaluate, reproduce):
        group.add_parsers(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lorahub-compeft")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except SystemExit:  # --help, --version, a usage error: their output too
        _flush_or_quiet(0)
        raise
    return _flush_or_quiet(code)  # a closed pipe shows here, not in the interpreter's exit


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv if argv is None else ["lorahub-compeft", *argv]  # for OUT/config.json
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    debug = args.debug or os.environ.get("LORAHUB_COMPEFT_DEBUG") == "1"
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        # Every command ends here: a known failure is one message with rc 2; anything else says
        # how to get the traceback (--debug keeps it). A reader that went away (`| head -1`)
        # ends the command quietly.
        if isinstance(err, BrokenPipeError) and stdout_closed():
            return _quiet_exit()
        if debug:
            raise
        message = error_message(err, args)
        if message is None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"error: unexpected {type(err).__name__}: {first} (this is a bug; rerun with "
                  "--debug for the traceback and report it)", file=sys.stderr)
            return 1
        print(f"error: {message}", file=sys.stderr)
        return 2


QUIET_EXIT = 141  # what a shell reports for a command ended by SIGPIPE


def _quiet_exit() -> int:
    """Nobody reads stdout any more: end without a word, and point stdout at /dev/null so that
    the interpreter's last flush has nowhere to fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    return QUIET_EXIT


def _flush_or_quiet(code: int) -> int:
    """`code`, once stdout is flushed; QUIET_EXIT, without a word, when nobody reads it."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_exit()
    return code
