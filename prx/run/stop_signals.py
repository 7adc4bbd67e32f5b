"""Stop cleanly when the scheduler says so: checkpoint at the end of the step, then exit.

SLURM sends SIGTERM at the time limit and on preemption (`#SBATCH --signal=TERM@120` sends it
two minutes ahead), cloud spot instances send SIGTERM before reclaiming the machine, and
torchrun passes a SIGTERM it gets on to its workers (not SIGUSR1: that one ends torchrun
itself, so send SIGUSR1 only to a `python train.py` run). Without a handler the process dies
mid-step and the run loses everything since its last checkpoint; with `StopSignals` the
signal only sets a flag, the step in flight finishes, every rank agrees on the step to stop
after, and the loop writes a checkpoint there before it exits with 128 + the signal number.

Ctrl-C (SIGINT) does the same, and says so; a second Ctrl-C stops at once (KeyboardInterrupt),
losing the steps since the last checkpoint, for when the step or the save itself hangs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Remembers the first stop signal this process got; `agreed` shares it across ranks."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._remember)

    def _remember(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum:  # a Ctrl-C after a stop signal: stop at once
                raise KeyboardInterrupt
            if os.environ.get("RANK", "0") == "0":
                print("\nCtrl-C: checkpointing at the end of this step, then stopping "
                      "(Ctrl-C again stops at once, without a checkpoint)", file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def agreed(self, device: torch.device, world_size: int) -> int:
        """The signal any rank got (0: none), the same on every rank. A one-number all-reduce a
        step when there are several ranks (signals reach them at different steps)."""
        if world_size == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        """Put back the handlers that were there before (for callers that run the trainer in-process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
