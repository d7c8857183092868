"""SIGTERM and SIGINT as a request to stop, which a long loop checks between steps.

Training saves its step and stops; an evaluation stops between batches and
writes nothing (`stoppable_evaluation`). Inside the `with` block the first
signal only sets `signal` and says so in the log; a second one, a second or
more later, is handled as it would be outside the block (SIGINT:
KeyboardInterrupt; SIGTERM: the process ends), for a user who will not
wait. The handlers in place before are restored on leaving it.
"""

import contextlib
import signal
import time

from absl import logging

from leo_tf import cli, progress

# A second signal sooner than this after the first is taken for the same one.
_REPEAT_SECONDS = 1.0


class StopRequest:
    """Records the first SIGTERM or SIGINT received inside the block.

    `signal` is None until one arrives, then its name ("SIGTERM" or "SIGINT";
    "SIGPIPE" for a closed standard output, `output_closed_stops`). Must be
    entered on the main thread (Python delivers signals there only).
    """

    def __init__(self, what_happens):
        """what_happens: the log's words for the loop's answer, e.g. "the
        meta-test stops after the current batch"."""
        self.signal = None
        self._what_happens = what_happens
        self._previous = {}
        self._first_at = None

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        del frame
        name = signal.Signals(number).name
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._first_at = name, now
            logging.warning(
                "%s received: %s; send %s again to stop at once",
                name,
                self._what_happens,
                name,
            )
            return
        if now - self._first_at < _REPEAT_SECONDS:
            return  # one Ctrl-C delivered twice (e.g. through a wrapper)
        self.__exit__()
        signal.raise_signal(number)  # now to the handler from before the block

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @contextlib.contextmanager
    def output_closed_stops(self):
        """Standard output closed by its reader inside (`... | head -3`, or
        `| tee` ended by the Ctrl-C that reached this process too) is a
        request to stop like a signal, "SIGPIPE": the loop saves and stops
        instead of dying with its unsaved steps. Standard output goes to
        /dev/null from then on."""
        try:
            yield
        except BrokenPipeError:
            if not cli.stdout_reader_gone():
                raise
            cli.discard_stdout()
            if self.signal is None:
                self.signal = "SIGPIPE"
                logging.warning(
                    "standard output closed (SIGPIPE): %s", self._what_happens
                )


@contextlib.contextmanager
def stoppable_evaluation(name, total, unit, results_file):
    """The block of an evaluation of `total` `unit` (e.g. "episodes") in batches.

    Yields after_batch(done), to call after each batch with the count done so
    far: it prints the progress line (progress.EpisodeProgress, labelled
    `name`) and, once a SIGTERM or SIGINT has arrived, raises cli.Stopped
    saying that nothing was written to `results_file`, unless that batch
    was the last.
    """
    log = progress.EpisodeProgress(name, total, unit=unit)
    with StopRequest(f"the {name} stops after the current batch") as stop:

        def after_batch(done):
            if stop.signal and done < total:
                raise cli.Stopped(
                    stop.signal,
                    f"the {name} stopped after {done} of {total} {unit}, before "
                    f"writing {results_file}; rerun the same command to evaluate",
                )
            log.update(done)

        yield after_batch


def training_stopped(step, limit, saved, skipped=None):
    """What a training command that a signal stopped says it saved and how
    to go on: the message of its `stopped:` line.

    Args:
      step: the step reached; limit: --num_steps_limit.
      saved: whether the checkpoint of `step` is saved (it is not when the
        weights are not finite).
      skipped: the evaluation that would have run after training, e.g.
        "the meta-test", or None.
    """
    if saved:
        state = f"checkpoint of step {step} of {limit} saved"
    else:
        state = f"step {step} of {limit} not saved (its weights are not finite; see the log)"
    if step >= limit and skipped and saved:
        return (
            f"training finished, {state}; {skipped} did not run; rerun the same "
            "command to evaluate"
        )
    after = f"; {skipped} did not run" if skipped else ""
    return f"{state}; rerun the same command to resume{after}"
