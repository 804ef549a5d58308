"""A process's memory, as the kernel counts it: what the large-teacher figures are made of.

The peak is the kernel's high-water mark of the resident set (VmHWM in /proc/self/status): exact,
unlike sampling RSS from outside. Linux lets a process reset it to the current RSS (`5` written to
/proc/self/clear_refs), so `Stages` gives each stage of a run its own peak, not the run's so far.
Some kernels (sandboxes such as gVisor) accept that write and ignore it: `peak_resettable` probes
once whether the reset really lowers the mark, and the figures say which kind they are."""

from __future__ import annotations

import functools
import mmap

PAGE = mmap.PAGESIZE
PROBE_BYTES = 32 * 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """This process's resident set now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (since it started or since the last reset)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Ask the kernel to lower the high-water mark to the current RSS; False where the write is
    refused (`peak_resettable` says whether an accepted one works)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def peak_resettable() -> bool:
    """Whether a reset really lowers the mark here: a PROBE_BYTES anonymous mapping is touched and
    unmapped (the mark rises by it), then a reset must take the mark back below it."""
    if not reset_peak():
        return False
    before = peak_rss_bytes()
    probe = mmap.mmap(-1, PROBE_BYTES)
    for offset in range(0, PROBE_BYTES, PAGE):
        probe[offset] = 1  # a write faults the page in: resident
    probe.close()
    raised = peak_rss_bytes()
    reset_peak()
    return raised - before > PROBE_BYTES // 2 and raised - peak_rss_bytes() > PROBE_BYTES // 2


class Stages:
    """Each stage's peak RSS in bytes, in order: `mark(name)` ends the stage begun by the last mark
    (or by the constructor). Where the peak cannot be reset, a stage's figure is the peak so far,
    and `resettable` says so."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.resettable = peak_resettable() and reset_peak()

    def mark(self, name: str) -> None:
        self.peaks[name] = peak_rss_bytes()
        reset_peak()

    def record(self) -> dict:
        return {"peak_rss_bytes": dict(self.peaks), "rss_bytes": rss_bytes(), "per_stage": self.resettable}
