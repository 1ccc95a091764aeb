"""Training entry point: `python -m tasks.train.entry SPEC.json`, alone or under `torchrun`.

    torchrun --nproc_per_node=8 -m tasks.train.entry train/<fp>/train_spec.json
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500 -m tasks.train.entry SPEC.json

The spec (`tasks.train.spec.TrainSpec`) is written by `tasks.train.stage.run_train`; the loop is
tasks/train/trainer.py. On failure every rank prints one `NEO_ERROR {"type", "message"}` line before its
traceback, which the parent re-raises.
"""
from __future__ import annotations

import json
import os
import sys


def emit_line(message: str) -> None:
    """One line in one write(2): lines of the ranks of a torchrun job share the parent's pipe, and a
    write under PIPE_BUF bytes is atomic there (print's separate newline write could interleave)."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (message + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train.entry SPEC.json", file=sys.stderr)
        return 2
    # imported here, not at the top: the usage message above comes without loading torch
    from tasks.train.spec import TrainSpec
    from tasks.train.trainer import ERROR, train_loop

    try:  # a spec that does not validate is reported like any other failure
        train_loop(TrainSpec.read(args[0]), emit=emit_line)
    except BaseException as e:
        emit_line(ERROR + json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
