"""`push_spool` entry point: replay spooled runs into the tracking server they belong to.

    python -m pipelines.entrypoints.push_spool [DIR ...]

A command whose tracking server stopped answering for longer than $CVAE_TRACKING_WAIT_S kept the
rest of its run(s) in a spool directory (``pipelines.tracking.spool``) and exited with code 3,
naming it. Given spool directories, or a folder of them (default: $CVAE_TRACKING_SPOOL_DIR, else
./mlruns-spool), this pushes each into the server recorded in it: the same runs get their missing
metrics (steps and timestamps kept), params, tags, artifacts, models, dataset inputs and end
status. A spool is removed once all of it is pushed; pushing again adds nothing twice.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from pipelines.entrypoints.command_line import CommandParser
from pipelines.entrypoints.common import run_main
from pipelines.errors import UserError
from pipelines.tracking.spool import RECORD, Spool, spool_root, spools

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.push_spool",
        description="Push runs kept in spool directories (while their tracking server did not answer) "
                    "into that server, then remove the spools.")
    parser.add_argument("dirs", nargs="*", metavar="DIR",
                        help="a spool directory, or a folder of them (default: $CVAE_TRACKING_SPOOL_DIR, "
                             "else ./mlruns-spool)")
    return parser


def spools_in(paths: Sequence[str]) -> list[Spool]:
    found = []
    for path in [Path(p) for p in paths] or [spool_root()]:
        if (path / RECORD).is_file():
            found.append(Spool(path))
        elif path.is_dir():
            found += spools(path)
        elif paths:
            raise UserError(f"DIR={str(path)!r} is not valid; no such spool directory")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.tracking.server_loss import health_problem
    from pipelines.tracking.spool import push_spool

    args = build_parser().parse_args(argv)
    found = spools_in(args.dirs)
    if not found:
        print("no spools to push")
        return 0
    for spool in found:
        server = spool.server
        problem = health_problem(server)
        if problem is not None:
            raise UserError(f"the tracking server of {spool.dir} is not answering ({problem}): "
                            "push once it is back")
        runs, added = push_spool(spool)
        print(f"pushed {spool.dir} into {server}: run(s) {', '.join(runs)}, {added} metric value(s) added; "
              "spool removed")
    return 0


if __name__ == "__main__":
    run_main(main)
