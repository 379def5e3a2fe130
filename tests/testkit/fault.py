"""Test-only fault injection: run the ``respiramfm`` CLI with a callback that SIGKILLs the process.

    python tests/testkit/fault.py STEP finetune --set ...

The callback fires at the end of optimiser step ``STEP`` (after that step's evaluation and
checkpoint, if any), exactly where a power cut between two steps would hit. Production code has
no hook for this: the script adds the callback to every :class:`Trainer` it creates.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from respiramfm.training import engine
from respiramfm.training.callbacks import Callback

SCRIPT = Path(__file__).resolve()


class KillAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def install(step: int) -> None:
    """Make every Trainer of this process carry :class:`KillAfterStep` (``step``)."""
    original = engine.Trainer.__init__

    def init(self, *args, callbacks=(), **kwargs):
        original(self, *args, callbacks=[*callbacks, KillAfterStep(step)], **kwargs)

    engine.Trainer.__init__ = init


def command(step: int, *cli_args: str) -> list[str]:
    """argv that runs ``respiramfm CLI_ARGS`` in a fresh interpreter, killed after ``step``."""
    return [sys.executable, str(SCRIPT), str(step), *cli_args]


if __name__ == "__main__":
    install(int(sys.argv[1]))
    from respiramfm import cli

    sys.exit(cli.main(sys.argv[2:]))
