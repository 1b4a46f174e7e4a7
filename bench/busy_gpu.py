"""Processes that keep the GPU busy with bf16 matrix products, to stand in for a slower GPU.

    python -m bench.busy_gpu            # one such process, until killed (what --busy-gpu N starts N of)

Without MPS the GPU runs the kernels of different processes by time-slicing, so a training job that
shares it with N busy processes gets about 1/(N+1) of its compute and memory bandwidth while its
host (Python, kernel launches) runs as fast as before. A step that the host limits on the H200
becomes one that the GPU limits: a proxy for a GPU N+1 times slower, not a measurement of one
(the slices also cost context switches, and the memory is not smaller).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def busy_gpu(processes: int) -> Iterator[None]:
    """Run `processes` busy processes for the duration of the block (none for 0)."""
    children = [
        subprocess.Popen([sys.executable, "-m", "bench.busy_gpu"], start_new_session=True) for _ in range(processes)
    ]
    try:
        yield
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def main() -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while True:  # until killed; a few products queued at a time, so the GPU always has work from here
        for _ in range(8):
            torch.mm(a, b)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
