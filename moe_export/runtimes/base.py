"""The runner interface: a runner only runs (comparison lives in validation/).

    with SomeRunner(...) as runner:
        outputs = runner.infer({"input_ids": ids, "attention_mask": mask})
        seconds = runner.last_inference_time()

Subclasses fill in `_activate`, `_infer` and `_deactivate`; heavy handles (sessions, engines) are
built by deferred callables inside `_activate`, never at construction.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from moe_export.errors import InternalError, MoeExportError
from moe_export.runtimes.taps import UnitCapture

Feeds = dict[str, np.ndarray]


class Runner(ABC):
    """Runs one model on one device; `infer` takes and returns numpy arrays by name."""

    name: str = "runner"
    device: str = "cpu"

    def __init__(self) -> None:
        self.is_active = False
        self._last_time: float | None = None
        self.taps_requested = False
        self.last_taps: dict[str, UnitCapture] = {}  # the last infer's per-unit taps, when requested

    def request_taps(self) -> bool:
        """Ask (before activate) for per-unit taps (runtimes/taps.py) with every `infer`, in `last_taps`.
        False when this runtime cannot tap its units; the outputs then come alone."""
        return False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            raise InternalError(f"{self.name}: already active")
        self._activate()
        self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def input_names(self) -> Sequence[str] | None:
        """The names `infer` requires, when the backend knows them."""
        return None

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise InternalError(f"{self.name}: call activate() (or use `with`) before infer()")
        expected = self.input_names()
        if expected is not None:
            missing = [n for n in expected if n not in feeds]
            if missing:
                raise MoeExportError(f"{self.name}: missing inputs {missing}; got {sorted(feeds)}")
        start = time.perf_counter()
        outputs = self._infer(feeds)
        self._last_time = time.perf_counter() - start
        return outputs

    run = infer  # the same call for callers used to a session's run()

    def last_inference_time(self) -> float:
        if self._last_time is None:
            raise InternalError(f"{self.name}: no inference has run yet")
        return self._last_time

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feeds: Feeds) -> dict[str, np.ndarray]: ...

    def _deactivate(self) -> None:  # noqa: B027 - optional hook
        pass
