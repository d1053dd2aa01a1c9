"""A process killed in the middle of SampleTracker.save leaves the previous file intact."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

import memfast

N = 8_000_000  # 3 stats x 8M x 4 B = 96 MB per save: long enough to be killed mid-write

SAVER = textwrap.dedent("""
    import sys, torch, memfast
    path = sys.argv[1]
    t = memfast.SampleTracker.load(path)
    version = 0
    while True:
        version += 1
        t.state.fill_(version)
        t.save(path)
""")


def test_kill_during_save_keeps_previous_file(tmp_path):
    path = str(tmp_path / "tracker.pt")
    t = memfast.SampleTracker(N)
    t.state.fill_(0)
    t.save(path)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, path])
    try:
        deadline = time.time() + 120
        # wait until a save is under way (its temporary file exists), then kill it
        while not glob.glob(path + ".*.tmp") and time.time() < deadline:
            time.sleep(0.01)
        assert glob.glob(path + ".*.tmp"), "the saver never started writing"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    loaded = memfast.SampleTracker.load(path)  # verifies format and checksum
    value = loaded.state[0, 0].item()
    assert value == int(value) and value >= 0
    assert torch.all(loaded.state == value), "the file mixes two versions"
    assert loaded.num_samples == N
    for leftover in glob.glob(path + ".*.tmp"):  # a killed save may leave its temp file; it is never read
        os.unlink(leftover)
