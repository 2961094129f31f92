"""CPU smoke test of ``bench/backend_overlap.py`` (the backend-vs-tracking overlap benchmark of issue 8).

Runs the script as a program (as the lead does on the GPU) on a tiny problem: no network (oracle outputs only),
64x48 images, 8 frames, all three modes, and checks the JSON it writes: every mode processed every frame without an
error, the statistics are consistent, the backend did work where it runs and none where it does not, and the lock
proxy saw no tracking wait when tracking and backend share one thread. Timing values themselves are not asserted.
Also checks the timing proxy of the keyframe lock directly (re-entrancy, per-role waits with a real contention).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "backend_overlap.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("backend_overlap", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timed_lock_counts_waits_per_role_and_is_reentrant():
    mod = _load_module()
    lock = mod.TimedLock(threading.RLock())
    held = threading.Event()

    def backend():
        mod._ROLE.name = "backend"
        with lock:
            with lock:  # re-entrant: one hold
                held.set()
                time.sleep(0.2)

    t = threading.Thread(target=backend)
    t.start()
    held.wait(5.0)
    mod._ROLE.name = "track"
    with lock:
        pass
    t.join()
    assert lock.wait_s["track"] > 0.05  # blocked while the backend held the lock
    assert lock.contended["track"] == 1
    assert len(lock.holds["backend"]) == 1 and lock.holds["backend"][0] >= 0.15
    assert len(lock.holds["track"]) == 1
    assert lock.acquire(blocking=False)
    lock.release()


@pytest.mark.slow
def test_backend_overlap_smoke_cpu(tmp_path):
    out = tmp_path / "overlap.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--frames", "8", "--warmup-frames", "2", "--img", "64x48",
           "--variant", "none", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backend overlap on" in proc.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["mode"]: r for r in data["results"]}
    assert set(rows) == {"interleaved", "threaded", "no-backend"}
    for mode, r in rows.items():
        assert r["errors"] == [], (mode, r["errors"])
        assert r["processed"] == 8 and r["timed_frames"] == 6 and r["dropped"] == 0
        assert r["fps"] > 0
        assert r["states"].get("TRACKING", 0) >= 1
        assert r["keyframes"] >= 2  # INIT keyframe + at least one from the motion
        t = r["track_ms"]
        assert 0 < t["median"] <= t["p95"] <= t["max"]
        assert r["latency_ms"]["median"] >= t["median"] - 1e-9  # latency includes the track call
        assert isinstance(r["ate_rmse_m"], float)
    # single thread: tracking never waits for the lock; the backend ran after the keyframes
    assert rows["interleaved"]["lock_wait_ms"]["max"] < 5.0
    assert rows["interleaved"]["backend_steps_with_work"] >= 1
    assert rows["interleaved"]["backend_lock_hold_ms"]["max"] > 0
    assert rows["threaded"]["backend_timer_calls"] >= 1
    assert rows["no-backend"]["backend_steps_with_work"] == 0
    assert rows["no-backend"]["backend_backlog_at_end"] >= 1  # keyframes queued, never served
