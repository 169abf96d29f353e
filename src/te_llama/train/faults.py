"""Faults during training turned into clear exits: Ctrl-C / SIGTERM, and running out of GPU memory.

A signal asks the training loop to stop after the current step; the loop saves a checkpoint
and raises `TrainingInterrupted`, whose exit code is the shell's (130 for SIGINT, 143 for
SIGTERM). A second Ctrl-C stops at once. Out of GPU memory becomes `OutOfMemory`, whose
message says how much was asked of the GPU and which options lower it.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from types import FrameType

import torch

from ..errors import TeLlamaError

logger = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(TeLlamaError):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class OutOfMemory(TeLlamaError, RuntimeError):
    """The GPU ran out of memory; the message names the settings that decide memory and the fixes."""


class StopRequests:
    """Within `with StopRequests() as stops:`, SIGINT and SIGTERM set `stops.signum` instead of killing.

    Handlers can only be installed from the main thread; elsewhere (a library caller's worker
    thread) signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second one acts at once
        logger.warning("%s: finishing this step and saving a checkpoint (send it again to stop at once)",
                       signal_name(signum))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def allocation_report(error: BaseException | None) -> str:
    """From torch's out-of-memory message: the request that failed, and the memory reserved but unallocated
    (fragmentation), e.g. "tried to allocate 1.95 GiB; 3.10 GiB reserved but unallocated"; "" if absent."""
    text = str(error or "")
    found = [re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text),
             re.search(r"([\d.]+ [KMG]iB) is reserved by PyTorch but unallocated", text)]
    parts = [f"tried to allocate {found[0][1]}" if found[0] else "",
             f"{found[1][1]} reserved but unallocated" if found[1] else ""]
    return "; ".join(p for p in parts if p)


def out_of_memory(device: torch.device, tokens_per_micro_batch: int, options: list[str], where: str,
                  error: BaseException | None = None) -> OutOfMemory:
    """The error to raise for a torch.OutOfMemoryError (`error`), after freeing what the failed step held."""
    detail = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_reserved(device)
        torch.cuda.empty_cache()
        report = allocation_report(error)
        detail = (f" ({torch.cuda.get_device_name(device)}: {total / 2**30:.1f} GiB, peak reserved by this run "
                  f"{peak / 2**30:.1f} GiB{'; ' + report if report else ''})")
    fixes = "; ".join(options)
    return OutOfMemory(f"out of GPU memory {where}{detail} with {tokens_per_micro_batch:,} tokens per micro-batch. "
                       f"Lower the memory it needs: {fixes}")
