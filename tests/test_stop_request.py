"""SIGTERM / SIGINT inside a StopRequest: recorded once, a second one acts at once."""

import logging
import os
import signal

import pytest

from leo_tf import stop_request


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_is_recorded_and_the_second_goes_to_the_handler_before(
    caplog, monkeypatch, signal_number
):
    """A repeat within a second is the same signal delivered twice; one a
    second later is the user's second, handled at once."""
    now = [100.0]
    monkeypatch.setattr(stop_request.time, "monotonic", lambda: now[0])
    name = signal.Signals(signal_number).name
    before = []
    previous = signal.signal(signal_number, lambda number, frame: before.append(number))
    try:
        with caplog.at_level(logging.WARNING):
            with stop_request.StopRequest("the loop stops after this step") as stop:
                assert stop.signal is None
                os.kill(os.getpid(), signal_number)
                assert stop.signal == name and before == []
                now[0] += 0.5
                os.kill(os.getpid(), signal_number)
                assert before == []  # taken for the first
                now[0] += 0.5
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


@pytest.mark.parametrize("earlier", [None, "SIGTERM"])
def test_a_closed_standard_output_is_a_stop_request(caplog, monkeypatch, earlier):
    """Its reader gone, output is discarded and the loop stops as for a
    SIGPIPE (an earlier signal stays the one reported)."""
    discarded = []
    monkeypatch.setattr(stop_request.cli, "stdout_reader_gone", lambda: True)
    monkeypatch.setattr(stop_request.cli, "discard_stdout", lambda: discarded.append(1))
    with caplog.at_level(logging.WARNING):
        with stop_request.StopRequest("the loop saves and stops") as stop:
            stop.signal = earlier
            with stop.output_closed_stops():
                raise BrokenPipeError(32, "Broken pipe")
    assert discarded == [1]
    assert stop.signal == (earlier or "SIGPIPE")
    logged = "standard output closed (SIGPIPE): the loop saves and stops"
    assert (logged in caplog.text) == (earlier is None)


def test_a_broken_pipe_other_than_standard_output_is_not_a_stop_request(
    monkeypatch,
):
    monkeypatch.setattr(stop_request.cli, "stdout_reader_gone", lambda: False)
    with stop_request.StopRequest("the loop saves and stops") as stop:
        with pytest.raises(BrokenPipeError):
            with stop.output_closed_stops():
                raise BrokenPipeError(32, "Broken pipe")
    assert stop.signal is None


@pytest.mark.parametrize(
    "step, saved, skipped, message",
    [
        (
            3,
            True,
            None,
            "checkpoint of step 3 of 9 saved; rerun the same command " "to resume",
        ),
        (
            3,
            True,
            "the meta-test",
            "checkpoint of step 3 of 9 saved; rerun the "
            "same command to resume; the meta-test did not run",
        ),
        (
            9,
            True,
            "the meta-test",
            "training finished, checkpoint of step 9 of 9 "
            "saved; the meta-test did not run; rerun the same command to evaluate",
        ),
        # Not saved at the last step: a rerun trains it again, then evaluates.
        (
            9,
            False,
            "the evaluation",
            "step 9 of 9 not saved (its weights are not "
            "finite; see the log); rerun the same command to resume; the evaluation "
            "did not run",
        ),
    ],
)
def test_the_stopped_line_of_training_says_what_is_saved_and_what_to_do(
    step, saved, skipped, message
):
    assert stop_request.training_stopped(step, 9, saved, skipped) == message
