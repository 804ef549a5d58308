"""Trainer callbacks that kill ranks, and a wrapper that runs the real CLI with them installed.

    python -m tests.faults.train --kill RANK:STEP[:GENERATION] [--hang RANK:STEP] [--kill-during-save STEP[:GENERATION]]
        -- <distkd CLI arguments>

runs `distkd.cli.main` with a callback (passed as its `callbacks` argument: no module state
is changed) that SIGKILLs rank RANK right after its optimizer step STEP, in launcher restart
generation GENERATION (default 0, the first start; see TORCHELASTIC_RESTART_COUNT), so a
restarted run is not killed again. Under torchrun the
wrapper is the script each rank runs; with --nproc the callback travels to the ranks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from distkd.cli import main as cli_main


@dataclass(frozen=True)
class KillRank:
    rank: int
    step: int
    generation: int = 0

    def __call__(self, trainer) -> None:
        if (trainer.env.rank, trainer.state.step, trainer.env.restart) == (self.rank, self.step, self.generation):
            print(f"[fault] SIGKILL rank {self.rank} after step {self.step} (generation {self.generation})",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class HangRank:
    """Rank RANK stops answering after step STEP (sleeps), as a wedged process would."""

    rank: int
    step: int
    generation: int = 0

    def __call__(self, trainer) -> None:
        if (trainer.env.rank, trainer.state.step, trainer.env.restart) == (self.rank, self.step, self.generation):
            print(f"[fault] rank {self.rank} hangs after step {self.step}", file=sys.stderr, flush=True)
            time.sleep(3600)


@dataclass(frozen=True)
class KillDuringSave:
    """Rank 0 dies after the checkpoint of step STEP is written, before it is committed, in
    restart generation GENERATION (so the restarted group, passing STEP again, commits it)."""

    step: int
    generation: int = 0

    def __call__(self, trainer) -> None:
        if (trainer.env.rank, trainer.state.step, trainer.env.restart) != (0, self.step, self.generation):
            return

        def die(partial, final, meta):
            print(f"[fault] SIGKILL rank 0 while committing {final.name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        trainer.checkpointer._commit = die


def _spec(cls, spec: str):
    return cls(*(int(x) for x in spec.split(":")))


def main(argv: list[str]) -> int:
    # torchrun's argument parser drops a "--" that comes straight after the module (no faults)
    split = argv.index("--") if "--" in argv else -1
    flags = {"--kill": KillRank, "--hang": HangRank, "--kill-during-save": KillDuringSave}
    faults = [_spec(flags[a], argv[i + 1]) for i, a in enumerate(argv[:max(split, 0)]) if a in flags]
    return cli_main(argv[split + 1:], callbacks=faults)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
