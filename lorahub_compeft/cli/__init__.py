"""The `lorahub-compeft` command: compress, inspect and export experts, keep a library of them,
and compose them for a new task from a few examples."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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


# Commands that load a base model (and so transformers): their library chatter is quieted.
MODEL_COMMANDS = ("compose", "demo", "bbh")
# Warnings of the libraries underneath (deprecations inside transformers, peft's note that it
# renamed base_model_name_or_path to the --model given) name nothing a user of the command can
# act on; --verbose shows them. The package's own warnings (logging) always show.
LIBRARY_MODULES = r"(transformers|peft|torch|huggingface_hub|accelerate|nevergrad|safetensors)\b"


class Parser(argparse.ArgumentParser):
    """A usage error is one line, as every other error (the usage itself is in --help)."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    except SystemExit as stop:  # --help, --version, a usage error: their output too
        if isinstance(stop.code, str):  # a command's own usage error: its line, argparse's rc
            print(stop.code if stop.code.startswith("error:") else f"error: {stop.code}",
                  file=sys.stderr)
            stop.code = 2
        _flush_or_quiet(0)
        raise
    return _flush_or_quiet(code)  # a closed pipe shows here, not in the interpreter's exit


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv if argv is None else ["lorahub-compeft", *argv]  # for OUT/config.json
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries(args.command in MODEL_COMMANDS)
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


def _quiet_libraries(loads_model: bool) -> None:
    """Keep the libraries' warnings, and transformers' "Loading weights" bars, off the
    terminal (downloads keep their progress bars)."""
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
    if not loads_model:
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging
    downloads_shown = not hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns the Hub's off too
    if downloads_shown:
        hub.enable_progress_bars()
    transformers_logging.set_verbosity_error()


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
