"""The child-process runner: events back, stop honoured, and an orphaned run stops itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _mim_tiny import tiny
from mim_workbench.models.checkpoint import list_checkpoints
from mim_workbench.training.runner import TrainingProcess

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has finished; only its exit status is left


def test_events_come_back_and_stop_checkpoints(tmp_path):
    run = TrainingProcess(tiny(tmp_path / "run", epochs=500, threads=1))
    run.start()
    events = []
    while run.running and not any(type(e).__name__ == "Progress" for e in events):
        events += run.poll(0.2)
    if hasattr(os, "getpriority"):   # the viewer goes first when both want a core
        from mim_workbench.training.runner import CHILD_NICENESS

        assert os.getpriority(os.PRIO_PROCESS, run._proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0)
                                                                     + CHILD_NICENESS)
    run.stop()
    while run.running:
        events += run.poll(0.2)
    run.join(10)
    names = [type(e).__name__ for e in events]
    assert names[0] == "Started" and "Progress" in names
    assert run.finished is not None and run.finished.reason == "stopped"
    assert list_checkpoints(tmp_path / "run")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see the orphaned child")
def test_a_run_whose_viewer_was_killed_checkpoints_and_exits(tmp_path):
    # The "viewer": a process that starts a run, reports the child's pid once training runs, then waits.
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        from _mim_tiny import tiny
        from mim_workbench.training.runner import TrainingProcess
        if __name__ == "__main__":
            run = TrainingProcess(tiny({str(tmp_path / "run")!r}, epochs=500, threads=1))
            run.start()
            while not any(type(e).__name__ == "Progress" for e in run.poll(0.2)):
                pass
            print(json.dumps({{"child": run._proc.pid}}), flush=True)
            time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = json.loads(parent.stdout.readline())["child"]
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)   # no clean-up in the viewer, no stop request
        parent.wait(10)
        deadline = time.monotonic() + 60
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the orphaned training process kept running"
    finally:
        if parent.poll() is None:
            parent.kill()
        if "child" in locals() and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert list_checkpoints(tmp_path / "run"), "it checkpointed before exiting"
