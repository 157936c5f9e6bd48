"""keep_freed_memory: a step's freed blocks come back without page faults (glibc on Linux)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scenetxtvar.training.allocator import keep_freed_memory

# A toy "training step" in a fresh interpreter: allocate and touch three 16 MiB activations, free them;
# prints the page faults of the last five of 20 steps. "unmap" pins glibc's initial 128 KiB mmap threshold
# (its default before it adapts to what a process frees, which it may or may not do for a given heap layout):
# every block is then unmapped on free, so the control arm always shows what the setting prevents.
STEPS = """
import ctypes, resource, sys, torch
from scenetxtvar.training.allocator import M_MMAP_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    acts = [torch.empty(4 << 20).fill_(1.0) for _ in range(3)]
    del acts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-5:]))
"""


def last_step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    pages = 5 * 3 * (16 << 20) // 4096  # what five steps touch
    assert last_step_faults("unmap") > pages // 2  # unmapped on free, faulted in again the next step
    assert last_step_faults("keep") < pages // 20
