#!/usr/bin/env python3
"""Does the backend block tracking? Per-frame tracking latency with the backend interleaved, on its own thread, or off.

Issue 8 asks that "the backend solve does not block tracking in multi_threaded mode", measured. The ROS node
(``mast3r_slam_ros/ros/node.py``) runs ``SlamSystem.track()`` in the image callback (frontend
``MutuallyExclusiveCallbackGroup``) and ``SlamSystem.backend_step()`` in a timer callback of period
``backend_period`` (default 0.05 s, backend group); ``executor: single_threaded`` serves both on one thread,
``multi_threaded`` on two. rclpy is not available on the GPU machine, so this script emulates the two executors with
plain threads (threads are fine in ``bench/``; the SLAM core starts none):

* ``interleaved`` (single-threaded executor): one thread; ``backend_step()`` once after every ``track()`` (as
  ``bench/pipeline.py``), so a keyframe's backend work delays the next frame;
* ``threaded`` (multi-threaded executor, 2 threads): thread A calls ``track()`` on the frame stream, thread B runs the
  backend timer: every ``--backend-period`` s one ``backend_step()``; when that did work, ``system.trajectory()`` (the
  node's path refresh, which also takes the keyframe lock). As an rcl timer, a callback that overran the period is
  followed at once by the next one, then the timer continues on its period grid. The map/diagnostics timers are not
  emulated (the map cloud is only computed when someone subscribes);
* ``no-backend``: ``track()`` only (the keyframe queue is never served): the reference latency.

Frames come from a camera at ``--rate`` Hz (0: as fast as tracking goes). With ``--policy all`` every frame is
processed (the queueing delay counts in the latency); ``latest`` skips frames a newer one has superseded when
tracking gets to them (the node's default ``frame_policy``), counted as drops. Per processed frame:

* ``track_ms``: wall time of ``track()`` plus the host copy of the pose (the node converts it to a message at once);
* ``latency_ms``: end of that copy minus the frame's arrival time (= ``track_ms`` when ``--rate 0``);
* ``lock_wait_ms``: time ``track()`` spent waiting for ``keyframes.lock`` (the store's ``threading.RLock`` wrapped in
  a timing proxy). ``Backend.step`` holds that lock for the edges *and* the whole global solve, so in ``threaded``
  mode this is the blocking the issue asks about; the backend's lock hold times are reported next to it.

Scene, predictor and network: those of ``bench/pipeline.py`` (imported): the synthetic ``loop`` path through the box
room, the full-size MASt3R network at ``--variant`` (e.g. ``graph-bf16+cl+ph``) whose outputs are replaced by exact
ray-cast ones (``HybridPredictor``), or ``none`` (oracle only: the SLAM cost alone). Each mode runs a fresh
``SlamSystem`` over the same frames; the first ``--warmup-frames`` are excluded from the statistics. Any exception in
either thread is reported (a CUDA graph capture on one thread while the other launches work could fail: such a
failure is a finding, not a bench bug). After the timed run the remaining backend queue is drained (untimed) so that
the ATE is comparable.

Usage::

    python bench/backend_overlap.py --variant graph-bf16+cl+ph --frames 500 --json overlap.json
    python bench/backend_overlap.py --variant graph-bf16+cl+ph --rate 30 --policy latest
    python bench/backend_overlap.py --device cpu --frames 20 --img 224x224 --variant none   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling bench modules, also when imported from a test

import pipeline  # noqa: E402  (bench/pipeline.py: scene, oracle, hybrid predictor, network variants)

from mast3r_slam_ros import kernels  # noqa: E402
from mast3r_slam_ros.config import load_config  # noqa: E402
from mast3r_slam_ros.slam.frame import Mode  # noqa: E402
from mast3r_slam_ros.slam.system import SlamSystem, native_preprocess  # noqa: E402

MODES = ("interleaved", "threaded", "no-backend")

#: thread-local role of the calling thread ("track" or "backend") for the lock statistics
_ROLE = threading.local()


def _role() -> str:
    return getattr(_ROLE, "name", "other")


# --------------------------------------------------------------------------------------------------- lock proxy
class TimedLock:
    """Drop-in proxy of the keyframe store's ``threading.RLock`` that times waits and holds per role.

    ``wait_s[role]``: total seconds spent inside ``acquire`` (blocked) by threads of that role; ``holds[role]``: list of
    hold durations in seconds (outermost acquire to matching release; the lock is re-entrant). Each role's counters are
    only written by its own thread, so reading a delta around a call of that thread is exact.
    """

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._tls = threading.local()
        self.wait_s: dict[str, float] = defaultdict(float)
        self.max_wait_s: dict[str, float] = defaultdict(float)
        self.contended: dict[str, int] = defaultdict(int)  # acquisitions that waited > 0.1 ms
        self.holds: dict[str, list[float]] = defaultdict(list)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        t0 = time.perf_counter()
        ok = self._lock.acquire(blocking, timeout)
        t1 = time.perf_counter()
        if ok:
            depth = getattr(self._tls, "depth", 0)
            if depth == 0:
                self._tls.t_acquired = t1
                role = _role()
                w = t1 - t0
                self.wait_s[role] += w
                self.max_wait_s[role] = max(self.max_wait_s[role], w)
                self.contended[role] += int(w > 1e-4)
            self._tls.depth = depth + 1
        return ok

    def release(self) -> None:
        depth = self._tls.depth - 1
        self._tls.depth = depth
        if depth == 0:
            self.holds[_role()].append(time.perf_counter() - self._tls.t_acquired)
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------- helpers
def _stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """median / p95 / max / mean of durations given in seconds, in milliseconds (None when empty)."""
    if not values_s:
        return {"median": None, "p95": None, "max": None, "mean": None}
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "max": float(a.max()),
            "mean": float(a.mean())}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Frontend:
    """The image callback: paced frame source + ``track()`` + per-frame records."""

    def __init__(self, system: SlamSystem, hyb: Any, images: list, stamps: list, lock: TimedLock, rate: float,
                 policy: str, warmup: int) -> None:
        self.system, self.hyb, self.images, self.stamps, self.lock = system, hyb, images, stamps, lock
        self.rate, self.policy, self.warmup = float(rate), policy, int(warmup)
        self.records: list[dict[str, Any]] = []
        self.dropped = 0
        self.t0 = 0.0
        self.t_timed_start: float | None = None
        self.t_end = 0.0

    def arrival(self, i: int) -> float:
        return self.t0 + i / self.rate if self.rate > 0 else 0.0

    def frames(self):
        """Indices to process, in order, waiting for each frame's arrival (policy ``latest`` skips superseded ones)."""
        n = len(self.images)
        self.t0 = time.perf_counter()
        i = 0
        while i < n:
            if self.rate > 0:
                now = time.perf_counter()
                if now < self.arrival(i):
                    time.sleep(self.arrival(i) - now)
                elif self.policy == "latest":
                    newest = min(n - 1, int((now - self.t0) * self.rate))
                    if newest > i and i >= self.warmup:
                        self.dropped += newest - i
                        i = newest
            yield i
            i += 1

    def track(self, i: int, role: str = "track") -> None:
        _ROLE.name = role
        if self.t_timed_start is None and i >= self.warmup:  # FPS clock: first timed frame's start (or arrival)
            self.t_timed_start = self.arrival(i) if self.rate > 0 else time.perf_counter()
        self.hyb.next_index = i
        w0 = self.lock.wait_s[role]
        t0 = time.perf_counter()
        res = self.system.track(self.images[i], int(self.stamps[i]))
        res.T_WC.data.cpu()  # the node turns the pose into a message right away (device -> host)
        t1 = time.perf_counter()
        self.t_end = t1
        arrival = self.arrival(i) if self.rate > 0 else t0
        self.records.append({"i": i, "track_s": t1 - t0, "latency_s": t1 - arrival,
                             "lock_wait_s": self.lock.wait_s[role] - w0, "state": Mode(res.state).name,
                             "kf": bool(res.is_keyframe), "timed": i >= self.warmup})


class _BackendTimer:
    """The node's backend timer callback on its own thread (``threaded`` mode)."""

    def __init__(self, system: SlamSystem, period: float) -> None:
        self.system, self.period = system, float(period)
        self.stop = threading.Event()
        self.steps_s: list[float] = []  # durations of backend_step calls that did work (+ path refresh)
        self.calls = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="backend-timer", daemon=True)

    def _run(self) -> None:
        _ROLE.name = "backend"
        start = time.perf_counter()
        next_t = start + self.period
        try:
            while not self.stop.is_set():
                now = time.perf_counter()
                if now < next_t and self.stop.wait(next_t - now):
                    break
                t0 = time.perf_counter()
                did = self.system.backend_step()
                if did:
                    self.system.trajectory()  # node: _refresh_path_if_moved (map_version changed)
                    self.steps_s.append(time.perf_counter() - t0)
                self.calls += 1
                end = time.perf_counter()
                # rcl timer: next call on the period grid; an overrun makes the timer ready at once (one call)
                k = int((end - start) / self.period) + 1
                next_t = end if end >= next_t + self.period else start + k * self.period
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.error = f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------- one mode
def run_mode(mode: str, args: argparse.Namespace, net: Any, oracle: "pipeline.BoxRoomOracle", images: list,
             stamps: list, dev: torch.device) -> dict[str, Any]:
    """Run ``mode`` over all frames with a fresh ``SlamSystem``; return its statistics (see the module docstring)."""
    overrides = {"runtime.device": str(dev), "runtime.kernel_backend": args.kernel_backend,
                 "runtime.sync_backend": False, "use_calib": bool(args.calib)}
    cfg = load_config(None, overrides)
    pre = None if (oracle.W, oracle.H) == (512, 384) else native_preprocess
    hyb = pipeline.HybridPredictor(net, oracle)
    K = oracle.K.double().cpu().numpy() if args.calib else None
    system = SlamSystem(hyb, cfg, K=K, preprocess=pre)
    lock = TimedLock(system.store.lock)
    system.store.lock = lock  # every user reads store.lock / keyframes.lock at call time
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    fe = _Frontend(system, hyb, images, stamps, lock, args.rate, args.policy, args.warmup_frames)
    errors: list[str] = []
    backend_steps_s: list[float] = []
    timer = None
    _sync(dev)
    try:
        if mode == "threaded":
            timer = _BackendTimer(system, args.backend_period)
            timer.thread.start()
        for i in fe.frames():
            if timer is not None and timer.error:
                break
            fe.track(i)
            if mode == "interleaved":
                _ROLE.name = "backend"
                t0 = time.perf_counter()
                if system.backend_step():
                    system.trajectory()
                    backend_steps_s.append(time.perf_counter() - t0)
                _ROLE.name = "track"
    except Exception as exc:  # noqa: BLE001 - reported in the results
        errors.append(f"frontend: {type(exc).__name__}: {exc}")
    finally:
        if timer is not None:
            timer.stop.set()
            timer.thread.join()
            backend_steps_s = timer.steps_s
            if timer.error:
                errors.append(f"backend thread: {timer.error}")
    _sync(dev)
    t_end = fe.t_end
    backlog = len(system.backend.queue) if system.backend is not None else 0
    # drain the queue (untimed) so the trajectories of all modes are comparable
    _ROLE.name = "drain"
    drained = 0
    if mode != "no-backend" and not errors:
        while system.backend_step():
            drained += 1
    timed = [r for r in fe.records if r["timed"]]
    n_timed = len(timed)
    elapsed = (t_end - fe.t_timed_start) if fe.t_timed_start is not None else 0.0
    waits = [r["lock_wait_s"] for r in timed]
    states: dict[str, int] = defaultdict(int)
    for r in fe.records:
        states[r["state"]] += 1
    out: dict[str, Any] = {
        "mode": mode, "variant": args.variant, "kernel_backend": kernels.backend(), "rate_hz": args.rate,
        "policy": args.policy, "backend_period_s": args.backend_period if mode == "threaded" else None,
        "frames": len(images), "processed": len(fe.records), "timed_frames": n_timed, "dropped": fe.dropped,
        "fps": n_timed / elapsed if elapsed > 0 else None,
        "track_ms": _stats_ms([r["track_s"] for r in timed]),
        "latency_ms": _stats_ms([r["latency_s"] for r in timed]),
        "lock_wait_ms": {**_stats_ms(waits), "total": 1e3 * float(sum(waits)),
                         "frames_over_1ms": int(sum(w > 1e-3 for w in waits))},
        "track_lock_contended_acquisitions": lock.contended.get("track", 0),
        "backend_steps_with_work": len(backend_steps_s),
        "backend_step_ms": _stats_ms(backend_steps_s),
        "backend_lock_hold_ms": _stats_ms(lock.holds.get("backend", [])),
        "track_lock_hold_ms": _stats_ms(lock.holds.get("track", [])),
        "backend_backlog_at_end": backlog, "drained_after_run": drained,
        "keyframes": len(system.store), "states": dict(states), "errors": errors,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "slowest_frames": sorted(({"i": r["i"], "track_ms": 1e3 * r["track_s"], "lock_wait_ms": 1e3 * r["lock_wait_s"]}
                                  for r in timed), key=lambda d: -d["track_ms"])[:5],
    }
    if timer is not None:
        out["backend_timer_calls"] = timer.calls
    if hasattr(net, "stats"):
        st = net.stats
        out["graphs"] = {"captured": st.captured, "replays": st.replays, "eager": st.eager, "failed": st.failed}
    try:
        out["ate_rmse_m"] = pipeline.ate_rmse(system, oracle, stamps)
    except Exception as exc:  # noqa: BLE001 - informative only
        out["ate_rmse_m"] = f"n/a ({type(exc).__name__}: {exc})"
    system.store.lock = lock._lock
    return out


# --------------------------------------------------------------------------------------------------- main
def _fmt(x: Any, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(f"\n{header}")
    print(f"{'mode':<12}{'FPS':>7}{'track med':>10}{'p95':>8}{'max':>8}{'lat med':>9}{'lat p95':>9}{'lat max':>9}"
          f"{'wait tot':>9}{'wait max':>9}{'>1ms':>5}{'bk steps':>9}{'bk med':>8}{'bk hold max':>12}{'KF':>4}"
          f"{'drop':>5}  errors")
    for r in rows:
        t, lat, w, bk, hold = r["track_ms"], r["latency_ms"], r["lock_wait_ms"], r["backend_step_ms"], \
            r["backend_lock_hold_ms"]
        print(f"{r['mode']:<12}{_fmt(r['fps'], '.1f'):>7}{_fmt(t['median']):>10}{_fmt(t['p95']):>8}{_fmt(t['max']):>8}"
              f"{_fmt(lat['median']):>9}{_fmt(lat['p95']):>9}{_fmt(lat['max']):>9}{_fmt(w['total'], '.1f'):>9}"
              f"{_fmt(w['max']):>9}{w['frames_over_1ms']:>5}{r['backend_steps_with_work']:>9}"
              f"{_fmt(bk['median'], '.1f'):>8}{_fmt(hold['max'], '.1f'):>12}{r['keyframes']:>4}{r['dropped']:>5}  "
              f"{'; '.join(r['errors']) or '-'}")
    print("ms; track = track() + pose copy; lat = arrival -> pose; wait = track() blocked on keyframes.lock "
          "(tot over timed frames, max per frame, frames > 1 ms); bk = backend steps that did work (ms) and the "
          "longest backend hold of the lock")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", default="full", choices=("full", "tiny"), help="MASt3R size (unless --variant none)")
    ap.add_argument("--img", "--size", dest="img", default="512x384", help="W x H of the images")
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--warmup-frames", type=int, default=10)
    ap.add_argument("--variant", default="graph-bf16+cl+ph",
                    help="network variant of bench/pipeline.py: eager-<prec>, graph-<prec>[+cl][+ph], or none")
    ap.add_argument("--kernel-backend", default="auto", choices=("auto", "cuda", "torch"))
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--rate", type=float, default=0.0, help="camera rate in Hz (0: frames as fast as tracking goes)")
    ap.add_argument("--policy", default="all", choices=("all", "latest"), help="frame policy when --rate > 0")
    ap.add_argument("--backend-period", type=float, default=0.05, help="backend timer period in s (node default)")
    ap.add_argument("--calib", action="store_true", help="use_calib=True (pixel + log-depth residuals)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    if args.frames <= args.warmup_frames:
        ap.error("--frames must be larger than --warmup-frames")

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    W, H = (int(v) for v in args.img.lower().split("x"))
    from mast3r_slam_ros.testing.scenes import intrinsics_for, sequence_poses

    poses = sequence_poses("loop", args.frames)
    oracle = pipeline.BoxRoomOracle(poses, intrinsics_for((W, H)), (H, W), dev)
    images = [oracle.colors(i) for i in range(args.frames)]
    stamps = [1_700_000_000 * 10**9 + i * 33_333_333 for i in range(args.frames)]
    model = None
    if args.variant != "none":
        from mast3r_slam_ros.network.model import Mast3rConfig, Mast3rModel

        mcfg = Mast3rConfig.full() if args.config == "full" else Mast3rConfig.tiny()
        with torch.device(dev):
            model = Mast3rModel(mcfg)
        model.eval()
    net = pipeline.build_network(args.variant, model)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    rows = []
    try:
        for mode in modes:
            r = run_mode(mode, args, net, oracle, images, stamps, dev)
            rows.append(r)
            print(json.dumps({k: r[k] for k in ("mode", "fps", "track_ms", "lock_wait_ms", "backend_steps_with_work",
                                                "keyframes", "errors")}), flush=True)
    finally:
        pipeline.release_network(net)
    print_table(rows, f"backend overlap on {name} ({dev.type}), {W}x{H}, {args.frames} frames (timed after "
                      f"{args.warmup_frames}), variant {args.variant}, rate {args.rate or 'max'} Hz, "
                      f"policy {args.policy}, backend period {args.backend_period} s")
    if args.json:
        payload = {"device": name, "device_type": dev.type, "torch": torch.__version__, "size": [W, H],
                   "frames": args.frames, "warmup_frames": args.warmup_frames, "variant": args.variant,
                   "config": args.config, "results": rows, "argv": sys.argv[1:] if argv is None else list(argv)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
