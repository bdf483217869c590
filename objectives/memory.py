"""Peak memory of one training run, on a GPU or a CPU.

On CUDA the allocator's own peak, `torch.cuda.max_memory_allocated` after a reset ("cuda_max_allocated").
On a CPU the process's anonymous resident memory is sampled every 10 ms while the trial runs, after handing
freed heap back to the system (glibc's `malloc_trim`), and the peak is reported above the trial's
starting size ("cpu_rss_above_start"): what this trial added, not the process's all-time peak
(`ru_maxrss`), which only grows from trial to trial in one process. The first trial of a network shape
in a process also holds the kernels oneDNN compiles for it (a few MiB), which later trials reuse.

Example:
    >>> peak = PeakMemory(torch.device("cpu"))
    >>> ...  # train
    >>> peak_bytes, source = peak.stop()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import weakref

import torch

SAMPLE_SECONDS = 0.01  # short enough to catch a forward/backward peak on a small network
SOURCES = {"cuda_max_allocated": "peak CUDA allocation of the trial",
           "cpu_rss_above_start": "peak resident memory the trial added on the CPU (sampled every 10 ms)"}


def _trim_heap() -> None:
    """Return freed heap pages to the system, so the starting size does not hide memory the trial will reuse."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """The process's anonymous resident memory now (Linux: RssAnon in /proc/self/status): heap, tensors and stacks,
    without the pages of shared libraries, which the first trial of a process touches for all the others."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("/proc/self/status has no RssAnon line")


_warmed_up = False


def _warm_up_once() -> None:
    """One tiny convolution trained a step and evaluated: torch's one-time CPU set-up (thread pools, oneDNN
    kernels, autograd engine; about 50 MiB) then counts for no trial, instead of for whichever comes first."""
    global _warmed_up
    if _warmed_up:
        return
    _warmed_up = True
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AvgPool2d(2), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = model.to(memory_format=memory_format)
        x = torch.rand(2, 1, 8, 8).contiguous(memory_format=memory_format)
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with torch.inference_mode():
            model(x)


def _sample(stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(SAMPLE_SECONDS):
        peak[0] = max(peak[0], resident_bytes())


class PeakMemory:
    """Starts measuring at construction; `stop()` returns (peak bytes, source). The CPU sampler thread also
    ends when the object is dropped, e.g. when training raises."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        if not os.path.exists("/proc/self/status"):
            return  # no cheap resident-size reading here (macOS, Windows): stop() reports 0 with source "unmeasured"
        _warm_up_once()
        _trim_heap()
        self._start = resident_bytes()
        self._peak = [self._start]
        thread = threading.Thread(target=_sample, args=(self._stop, self._peak), name="peak-memory", daemon=True)
        thread.start()
        weakref.finalize(self, self._stop.set)

    def stop(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        if not hasattr(self, "_peak"):
            return 0, "unmeasured"
        self._stop.set()
        peak = max(self._peak[0], resident_bytes())
        return peak - self._start, "cpu_rss_above_start"
