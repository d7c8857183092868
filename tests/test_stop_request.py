"""SIGTERM / SIGINT inside a StopRequest: recorded once, a second one acts at once."""

import logging
import os
import signal

import pytest

from leo_tf import stop_request


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_recorded_and_the_second_goes_to_the_handler_before(
    caplog, signal_number
):
    name = signal.Signals(signal_number).name
    before = []
    previous = signal.signal(signal_number, lambda number, frame: before.append(number))
    try:
        with caplog.at_level(logging.WARNING):
            with stop_request.StopRequest("the loop stops after this step") as stop:
                assert stop.signal is None
                os.kill(os.getpid(), signal_number)
                assert stop.signal == name and before == []
                os.kill(os.getpid(), signal_number)
                assert before == [signal_number]  # the user's second: at once
                assert stop.signal == name
        assert caplog.text.count(" received: ") == 1
        assert (
            f"{name} received: the loop stops after this step; send {name} again "
            "to stop at once" in caplog.text
        )
        os.kill(os.getpid(), signal_number)
        assert before == [signal_number, signal_number]
    finally:
        signal.signal(signal_number, previous)


def test_the_handlers_from_before_are_restored_on_leaving():
    previous = {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)}
    with stop_request.StopRequest("it stops"):
        assert signal.getsignal(signal.SIGTERM) is not previous[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is not previous[signal.SIGINT]
    assert {n: signal.getsignal(n) for n in previous} == previous
