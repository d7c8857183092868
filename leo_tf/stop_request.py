"""SIGTERM and SIGINT as a request to stop, which a long loop checks between steps.

Training saves its step and stops; a meta-test stops between batches and
writes nothing. Inside the `with` block the signals only set `signal`; the
handlers in place before are restored on leaving it.
"""

import signal


class StopRequest:
    """Records the first SIGTERM or SIGINT received inside the block.

    `signal` is None until one arrives, then its name ("SIGTERM" or "SIGINT").
    Must be entered on the main thread (Python delivers signals there only).
    """

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        del frame
        self.signal = self.signal or signal.Signals(number).name

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
