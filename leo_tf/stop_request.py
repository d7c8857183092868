"""SIGTERM and SIGINT as a request to stop, which a long loop checks between steps.

Training saves its step and stops; a meta-test stops between batches and
writes nothing. Inside the `with` block the first signal only sets `signal`
and says so in the log; a second one is handled as it would be outside the
block (SIGINT: KeyboardInterrupt; SIGTERM: the process ends), for a user who
will not wait. The handlers in place before are restored on leaving it.
"""

import signal

from absl import logging


class StopRequest:
    """Records the first SIGTERM or SIGINT received inside the block.

    `signal` is None until one arrives, then its name ("SIGTERM" or "SIGINT").
    Must be entered on the main thread (Python delivers signals there only).
    """

    def __init__(self, what_happens):
        """what_happens: the log's words for the loop's answer, e.g. "the
        meta-test stops after the current batch"."""
        self.signal = None
        self._what_happens = what_happens
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        del frame
        name = signal.Signals(number).name
        if self.signal is None:
            self.signal = name
            logging.warning(
                "%s received: %s; send %s again to stop at once",
                name,
                self._what_happens,
                name,
            )
            return
        self.__exit__()
        signal.raise_signal(number)  # now to the handler from before the block

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
