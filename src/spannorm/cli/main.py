"""Entry point of the ``spannorm`` console script.

Every module of ``spannorm.cli`` that defines ``register(subparsers)`` adds one subcommand; ``register``
returns the parser it made, with ``set_defaults(run=FUNCTION)``. ``FUNCTION(args) -> int`` is the exit code.
User errors (:class:`spannorm.config.ConfigError` and :class:`UsageError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import spannorm
import spannorm.cli as cli_pkg
from spannorm.config import ConfigError
from spannorm.configuration import MAX_SEED


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, nothing written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors (a bad choice, a value that is not a number, a missing argument) on one line,
    like every other user error, instead of the usage block and the error; subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def seed_arg(text: str) -> int:
    """The argparse ``type`` of every ``--seed``: an integer from 0 to 2**63 - 1 (:data:`MAX_SEED`)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: an integer from 0 to 2**63 - 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="spannorm",
        description="Train, measure and compare deep Transformers whose normalization placement "
                    "(SpanNorm, PreNorm, PostNorm, Peri-LN, DeepNorm, ...) is a declarative choice.",
    )
    parser.add_argument("--version", action="version", version=f"spannorm {spannorm.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_pkg.__path__), key=lambda m: m.name):
        if info.name == "main":
            continue
        module = importlib.import_module(f"spannorm.cli.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Commands that take dotted config overrides (``--model.n_layers=24``) set accepts_overrides=True.
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ConfigError, UsageError) as err:
        print(f"spannorm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
