"""Test-session settings.

One intra-op thread: on a 2-core machine that other processes also load, torch's default two threads
were seen to slow small-tensor work by 10-100x (both threads spin-waiting on a busy core), which made
the suite's timing unpredictable.  Numbers do not depend on it; speed is measured in benchmarks/, not here.
The environment variable also reaches the subprocesses that some tests start.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
