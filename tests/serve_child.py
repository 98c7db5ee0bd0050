"""`ti-fast serve` as a child process for the restart tests: the CLI's own parser and serve(),
with the training group of serve_helpers.group_factory (the real one once ti_fast has it)."""
from __future__ import annotations

import argparse
import sys

from serve_helpers import group_factory

from ti_fast.cli import process_settings, run_command
from ti_fast.serve.cli import add_serve_parser, serve, settings_from_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="serve_child")
    add_serve_parser(parser.add_subparsers(dest="cmd"), process_settings=process_settings)
    a = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    factory = group_factory()
    return run_command(lambda a: serve(settings_from_args(a), process_settings=a.process_settings,
                                       group_factory=factory), a)


if __name__ == "__main__":
    sys.exit(main())
