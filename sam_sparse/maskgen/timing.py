"""Where a pipeline's time goes: seconds per stage, measured only when asked (measuring waits for the GPU
at every stage boundary, which costs the overlap a normal run has)."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict

import torch

STAGES = ("prepare", "encoder", "decoder", "upsample", "post", "rle", "host")


class Stopwatch:
    """lap(stage) adds the seconds since the previous lap (or start) to `stage`, after waiting for the
    device; a disabled Stopwatch does nothing (no device waits)."""

    def __init__(self, enabled: bool = False, device: torch.device = torch.device("cpu")):
        self.enabled = enabled
        self.device = torch.device(device)
        self.seconds: Dict[str, float] = defaultdict(float)
        self._last = None

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.seconds[stage] += now - self._last
            self._last = now

    def take(self) -> Dict[str, float]:
        """The seconds per stage so far, and reset."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
