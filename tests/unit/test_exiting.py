from __future__ import annotations

import threading

from pgsynapse import exiting


def test_the_fast_exit_waits_for_a_thread_that_is_ending_and_names_one_that_is_not():
    # the third fresh-clone run of session 37: a stopped worker's AnyIO worker thread was still ending (it ends a
    # moment after its event loop closes) when the exit looked, so the worker took the slow exit
    # (waits_for_threads=['AnyIO worker thread']); the exit now waits for such a thread as Python's own would
    go, stay = threading.Event(), threading.Event()
    ending = threading.Thread(target=go.wait, name="ending")
    stuck = threading.Thread(target=stay.wait, name="stuck")
    ending.start()
    go.set()  # it ends now, but may still be alive at the next line
    assert exiting._threads_left() == []
    stuck.start()
    try:
        assert exiting._threads_left(wait=0.05) == ["stuck"]
    finally:
        stay.set()
        stuck.join()
