"""cpu_allocator=reuse (qgplm.train.host_memory): a step's large temporaries reuse mapped pages.

Counted as the kernel counts them (minor page faults, getrusage), in a fresh process for each mode
(the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from qgplm.train.host_memory import CPU_ALLOCATORS, set_cpu_allocator

PAGES = 64 * 2**20 // 4096  # 4 KiB pages of one 64 MiB temporary

# A training step in miniature: from a "weight", three temporaries of 64, 4 and 64 MiB that live
# together and are freed together, step after step. Minor page faults (getrusage) and the resident
# set (/proc/self/statm) after every step.
STEPS = """
import json, os, resource, sys, torch
from qgplm.train.host_memory import set_cpu_allocator
applied = all([set_cpu_allocator(mode) for mode in sys.argv[1].split(",")])  # in order, e.g. reuse,system
page = os.sysconf("SC_PAGE_SIZE")
w = torch.randn(4096, 4096)
faults, rss = [], []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    q = w.clamp(-1.0, 1.0)
    y = torch.mm(q[:256], q.t())
    z = q * 2.0
    float(z.sum() + y.sum())
    del q, y, z
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rss.append(int(open("/proc/self/statm").read().split()[1]) * page / 2**20)
print(json.dumps({"applied": applied, "faults": faults, "rss_mib": rss}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


WARM = 10  # steps before the heap holds blocks for every size (it took 3-10 steps, run to run)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="cpu_allocator=reuse sets glibc's malloc; other allocators are left as they are")
def test_reuse_stops_the_page_faults_that_system_pays_every_step():
    system, reuse = _faults("system"), _faults("reuse")
    assert system["applied"] and reuse["applied"]
    # malloc's defaults: each 64 MiB temporary is a fresh mmap, its pages fault again at every step
    assert min(system["faults"][WARM:]) > 1.9 * PAGES, system
    # reuse: after a few warm-up steps the temporaries land on pages the heap already holds
    steady = sorted(reuse["faults"][WARM:])
    assert steady[len(steady) // 2] < 0.05 * PAGES, reuse  # the median step faults nothing
    assert sum(reuse["faults"][WARM:]) < 0.25 * sum(system["faults"][WARM:]), (reuse, system)
    # system after reuse in one process (a sweep's jobs, tests): malloc's behaviour is back
    back = _faults("reuse,system")
    assert back["applied"] and min(back["faults"][WARM:]) > 1.9 * PAGES, back


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="cpu_allocator must be one of"):
        set_cpu_allocator("jemalloc")
    assert CPU_ALLOCATORS == ("reuse", "system")
