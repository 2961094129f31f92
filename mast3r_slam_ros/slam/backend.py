"""Backend of the SLAM system (factor graph, global solve, loop closure, relocalization).

PLACEHOLDER owned by the backend work (issue 6): the interface below is what ``SlamSystem`` calls; the real
implementation replaces this file. ``step()`` here only dequeues keyframes and performs no optimization.
"""

from __future__ import annotations


class Backend:
    """One-unit-at-a-time backend driven by ``SlamSystem.backend_step()``.

    Interface: ``Backend(store, predictor, cfg, K=None)``, ``queue_keyframe(idx)``, ``has_work() -> bool``,
    ``step() -> bool`` (one queued keyframe's edges + global solve; True if work was done),
    ``relocalize(frame) -> bool`` (one relocalization attempt), ``reset()``, ``loop_closures`` (int).
    """

    def __init__(self, store, predictor, cfg, K=None):
        self.store, self.predictor, self.cfg, self.K = store, predictor, cfg, K
        self.queue: list[int] = []
        self.loop_closures = 0

    def queue_keyframe(self, idx: int) -> None:
        self.queue.append(int(idx))

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> bool:
        if not self.queue:
            return False
        self.queue.pop(0)
        return True

    def relocalize(self, frame) -> bool:
        return False

    def reset(self) -> None:
        self.queue.clear()
        self.loop_closures = 0
