"""Training entry point: `python -m tasks.train_entry SPEC.json`, alone or under `torchrun`.

    torchrun --nproc_per_node=8 -m tasks.train_entry runs/<fp>/train_spec.json
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500 -m tasks.train_entry SPEC.json

The spec is written by `tasks.train.run_train` (see tasks/trainer.py). On failure every rank prints
one `NEO_ERROR {"type", "message"}` line before its traceback, which the parent re-raises.
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train_entry SPEC.json", file=sys.stderr)
        return 2
    from tasks.trainer import ERROR, train_loop

    spec = json.loads(open(args[0]).read())
    try:
        train_loop(spec, emit=lambda m: print(m, flush=True))
    except BaseException as e:
        print(ERROR + json.dumps({"type": type(e).__name__, "message": str(e)}), flush=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
