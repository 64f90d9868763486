"""The launch-config tuner (triton_attn._tune) with a fake clock: no GPU and no kernel launch.

A tuning run times each candidate twice (in order, then in reverse) and ranks by the mean, so a clock
that drifts over the run weighs on every candidate alike; a winner whose two timings disagree is used but
not written to the disk cache; the disk cache is read back without timing anything.
"""

import json

import pytest
import torch
from triton.runtime.errors import OutOfResources

from sam_sparse.kernels import triton_attn

A, B, C = (dict(BLOCK_M=m, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=2) for m in (16, 32, 64))
TRUE_MS = {16: 1.00, 32: 1.03, 64: 1.10}  # A is the fastest; B within 3% of it


class FakeClock:
    """bench(cfg): the config's true time times a factor that moves by `drift` per call (a GPU clock
    still changing); calls listed in `burst` read `burst_factor` times slower (another process)."""

    def __init__(self, drift=0.0, burst=(), burst_factor=2.0, too_big=()):
        self.drift, self.burst, self.burst_factor, self.too_big = drift, set(burst), burst_factor, too_big
        self.calls = []

    def __call__(self, cfg):
        n = len(self.calls)
        self.calls.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] in self.too_big:
            raise OutOfResources(300_000, 232_448, "shared memory")
        ms = TRUE_MS[cfg["BLOCK_M"]] * (1 - self.drift * n)
        return ms * self.burst_factor if n in self.burst else ms


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """triton_attn with empty tuning tables and its disk cache at tmp_path/tune.json."""
    path = tmp_path / "tune.json"
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setattr(triton_attn, "_DISK", {})
    monkeypatch.setattr(triton_attn, "_tune_file", lambda device: path)
    return path


def tune(key, clock):
    return triton_attn._tune(key, [A, B, C], clock, torch.device("cpu"))


def test_a_drifting_clock_does_not_pick_a_slower_config(tuner):
    """A clock 4% faster per call: timed once each, in order, B (3% slower) would read fastest."""
    clock = FakeClock(drift=0.04)
    single = [TRUE_MS[c["BLOCK_M"]] * (1 - 0.04 * i) for i, c in enumerate((A, B, C))]
    assert min(range(3), key=single.__getitem__) == 1, "the premise: one timing each in order picks B"
    assert tune(("drift",), clock) == A
    assert clock.calls == [16, 32, 64, 64, 32, 16], clock.calls
    # A's two readings (calls 0 and 5) differ by 20%: not steady, so not kept for the next process.
    assert not tuner.exists()


def test_a_steady_winner_is_kept_on_disk_and_read_back_untimed(tuner, monkeypatch):
    clock = FakeClock()
    assert tune(("steady",), clock) == A
    assert json.loads(tuner.read_text()) == {repr(("steady",)): A}
    monkeypatch.setattr(triton_attn, "_TUNED", {})  # a new process: only the disk remembers
    monkeypatch.setattr(triton_attn, "_DISK", {})
    again = FakeClock()
    assert tune(("steady",), again) == A
    assert again.calls == []


def test_a_burst_on_a_loser_changes_nothing(tuner):
    """Another process slows B's second reading (call 4) by half: A still wins, steady, and is kept."""
    clock = FakeClock(burst=(4,), burst_factor=1.5)
    assert tune(("burst",), clock) == A
    assert json.loads(tuner.read_text()) == {repr(("burst",)): A}


def test_an_unsteady_winner_serves_the_process_but_not_the_disk(tuner):
    """Both readings of every config disturbed, A's by 30% apart: A is used, and nothing is written."""
    clock = FakeClock(burst=(0,), burst_factor=0.7)
    assert tune(("noisy",), clock) == A
    assert not tuner.exists()
    assert triton_attn._TUNED[("noisy",)] == A


def test_configs_that_do_not_fit_are_skipped_and_none_fitting_is_an_error(tuner):
    clock = FakeClock(too_big=(16,))
    assert tune(("fit",), clock) == B
    assert clock.calls == [16, 32, 64, 64, 32]  # A raised once and was not timed again
    with pytest.raises(RuntimeError, match="no launch config of the kernel fits this GPU"):
        tune(("none",), FakeClock(too_big=(16, 32, 64)))


def test_no_bench_takes_the_first_candidate_untimed(tuner):
    assert triton_attn._tune(("fixed",), [B, A], None, torch.device("cpu")) == B
    assert not tuner.exists()


def test_a_cached_fill_split_serves_a_call_that_cannot_split(tuner, monkeypatch):
    """A class tuned on a call whose keys split ("fill", A split won) is read back untimed by a call of the same
    class with too few key tiles to split (no fill candidate offered): it must not tune the class again."""
    a_fill = {**A, "SPLIT_K": "fill"}
    clock = FakeClock()
    assert triton_attn._tune(("fill",), [A, a_fill], lambda cfg: clock(cfg) * (0.5 if "SPLIT_K" in cfg else 1.0),
                             torch.device("cpu")) == a_fill
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setattr(triton_attn, "_DISK", {})
    again = FakeClock()
    assert triton_attn._tune(("fill",), [A, B], again, torch.device("cpu")) == a_fill
    assert again.calls == []
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setattr(triton_attn, "_DISK", {})
    other = FakeClock()  # a cached config whose twin is not offered either is timed again
    assert triton_attn._tune(("fill",), [B, C], other, torch.device("cpu")) == B
    assert other.calls


def test_host_scale_costs_tie_within_noise_and_gpu_time_breaks_the_tie(tuner):
    """A host-scale class ranks (cost, GPU ms) pairs: configs whose cost is within TUNE_TIE of the lowest are
    tied (their launches all wait on the host, and differ by its noise), and the least GPU time among them wins;
    a config whose host cost puts it out of the tie (a TMA tile's descriptors) loses even with the least GPU time."""
    cost = {16: (0.070, 0.011), 32: (0.034, 0.0135), 64: (0.033, 0.0140)}  # A: TMA-like; B, C: pointer loads
    assert tune(("host",), lambda cfg: cost[cfg["BLOCK_M"]]) == B
    # Without the tie, the lowest cost would win: C.
    assert min(cost, key=lambda m: cost[m][0]) == 64
    # Plain floats (GPU time alone, every other class): the fastest, as before.
    assert tune(("gpu",), lambda cfg: cost[cfg["BLOCK_M"]][1]) == A


def test_known_config_is_what_the_first_launch_compiles(tuner, monkeypatch):
    """compile_ahead compiles, per class, what _tune would run next: the class's config from this process's table or
    the disk cache, without timing; every candidate where neither knows it (the tuner will time them all), or where
    the disk's config is not offered."""
    known = lambda key, cands: triton_attn._known_config(key, cands, torch.device("cpu"))  # noqa: E731
    assert known(("new",), [A, B, C]) == [A, B, C]
    assert tune(("kept",), FakeClock()) == A
    assert known(("kept",), [A, B, C]) == [A]
    monkeypatch.setattr(triton_attn, "_TUNED", {})  # a new process: the disk answers
    monkeypatch.setattr(triton_attn, "_DISK", {})
    assert known(("kept",), [C, A]) == [A]
    assert known(("kept",), [B, C]) == [B, C], "a cached config not offered is tuned again"
