"""The collector's pauses overlap safely across threads (sandbox/_gcpause.py)."""

from __future__ import annotations

import gc
import threading

from airlock.sandbox import _gcpause


def test_a_pause_turns_the_collector_off_and_back_on() -> None:
    assert gc.isenabled()
    with _gcpause.paused():
        assert not gc.isenabled()
        with _gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with _gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_on_many_threads_leave_it_on() -> None:
    # The interleaving a per-call "was it on?" loses: one pause ends while another begins.
    # Every thread checks the collector is off inside its own pause, whatever the others do.
    wrong: list[str] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(2000):
            with _gcpause.paused():
                if gc.isenabled():
                    wrong.append("on inside a pause")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    assert gc.isenabled()
