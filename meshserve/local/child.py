"""How `up` runs its children: the meshserve CLI, then an exit that skips the interpreter's teardown.

Every command `up` starts (registry dev, serve, gateway) stops itself explicitly before it returns —
NOT_SERVING, deregister, drain, flush traces, save state. What the interpreter would do after that is
finalise the module graph (torch, grpc, numpy): seconds of CPU per process, in a full garbage
collection. With a dozen children stopping at once on a shared box that was most of `up`'s stop time,
and children orphaned by a SIGKILLed `up` spent minutes in it.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback


def run(argv: list[str]) -> int:
    from meshserve.children import die_with_parent
    from meshserve.local.supervisor import PARENT_ENV

    parent = os.environ.pop(PARENT_ENV, "")  # popped: not for processes this one starts
    if parent:
        die_with_parent(int(parent))
    from meshserve.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse and friends
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    code = run(sys.argv[1:])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
