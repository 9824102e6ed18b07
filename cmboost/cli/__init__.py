"""`cmboost <verb>`: each verb is a thin layer over an importable function.

A verb lives in its own module here with `add_parser(subparsers)`, which registers the verb
and sets `run(args) -> int` as its handler. Bad input raises UserInputError, which becomes one
line on stderr and exit code 2.

This module imports nothing heavy at its top: the console script imports it first, and Ctrl-C
while numpy and torch load (the first second of every command) must give one line and exit 130
like Ctrl-C at any later moment, not a traceback. So the parser and the verbs (cli/_app.py) are
imported inside `main`, under its handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = "cmboost: interrupted"


def build_parser():
    """The parser of every verb (imports the verbs, and through their defaults torch)."""
    from cmboost.cli._app import build_parser as build

    return build()


def main(argv: list[str] | None = None) -> int:
    as_script = argv is None  # the console script (tests pass argv, and keep their own Ctrl-C handling)
    try:
        try:
            parser = build_parser()  # imports torch: Ctrl-C here must not print a traceback either
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            return 130
        from cmboost.cli._app import run

        return run(parser, argv)
    except KeyboardInterrupt:  # while parsing, or between a verb's end and here
        print(INTERRUPTED, file=sys.stderr)
        return 130
    finally:
        if as_script:  # a caller that passes argv owns the process and its group (the torchrun tests)
            _leave_process_group()
            _exit_at_once_on_ctrl_c()


def _leave_process_group() -> None:
    """Under torchrun, leaves the process group before the interpreter's teardown: a gloo group left
    to it can abort a rank ("terminate called without an active exception", exit -6) when the other
    rank has already gone, as seen on a loaded machine."""
    torch = sys.modules.get("torch")  # never imported here for a verb that did not need it
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _exit_at_once_on_ctrl_c() -> None:
    """From the verb's end to the process's (atexit handlers, torch's teardown), Ctrl-C flushes what
    was printed and exits 130 at once, instead of a KeyboardInterrupt raised inside the teardown."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupted(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a stream in any state; exiting anyway
                pass
        os.write(2, (INTERRUPTED + "\n").encode())
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


if __name__ == "__main__":
    sys.exit(main())
