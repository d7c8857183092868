"""What the command-line programs share: one error line, never a traceback.

`run(prog, main)` is `absl.app.run(main)` where every way of failing ends in
one line on stderr and a non-zero exit status:

* a flag that does not parse, a --flagfile that cannot be opened, or a
  `Failure` (an expected error: the message names the flag or file):
  `<prog>: error: <message>`, exit 1;
* any other exception: `<prog>: error: <Type>: <first line of its message>
  (rerun with --debug for the traceback)`, exit 1;
* Ctrl-C: exit 130, quietly;
* standard output closed by its reader (`... | head -1`): exit 141 (128 +
  SIGPIPE), quietly, as a program that SIGPIPE ends;
* a command that a signal stopped (`Stopped`: training saved its step, or
  an evaluation did not write its results): `<prog>: stopped: <message>`,
  exit 128 + the signal's number (SIGINT 130, SIGTERM 143), as shells
  report a command that the signal ended, so that `train && export` does
  not go on with an unfinished run. A training loop takes a closed standard
  output for a SIGPIPE of this kind (`stop_request.StopRequest`): it saves
  its step and ends with exit 141 and this line.

With --debug, the traceback is printed before that line. No TensorFlow is
imported here, so flag errors are reported before it loads.
"""

import contextlib
import errno
import os
import select
import signal
import sys
import traceback

from absl import app, flags, logging

from leo_tf import error_text

flags.DEFINE_boolean(
    "debug", False, "Print the full traceback of an error before its one line."
)

_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_PIPE_CLOSED = 141  # 128 + SIGPIPE


class Failure(Exception):
    """An expected error; its message, naming the flag or file, is the line."""


class Stopped(Exception):
    """A signal stopped the command: training after saving its step, or an
    evaluation before writing its results.

    signal_name: e.g. "SIGTERM"; the message (the line) says what was saved
    or not written, and how to go on.
    """

    def __init__(self, signal_name, message):
        super().__init__(f"{signal_name}: {message}")
        self.status = 128 + signal.Signals[signal_name].value


@contextlib.contextmanager
def reported(*errors):
    """Turns the exceptions of classes `errors` raised inside into `Failure`."""
    try:
        yield
    except errors as error:
        raise Failure(str(error)) from error


def run(prog, main, argv=None):
    """Runs `main` as absl.app.run does, ending any failure in one line."""
    app.run(
        _guarded(prog, main),
        argv=argv,
        flags_parser=lambda args: _parse_flags(prog, args),
    )


def _parse_flags(prog, args):
    try:
        return flags.FLAGS(args)
    except flags.CantOpenFlagFileError as error:
        _exit(prog, _unreadable_flagfile(error), 1)
    except flags.Error as error:
        _exit(prog, f"{error} (see --helpfull)", 1)


def _unreadable_flagfile(error):
    """`--flagfile=NAME: no such file` (or why else it could not be opened),
    from absl's error, raised while handling the OSError of opening it."""
    cause = error.__context__
    if not isinstance(cause, OSError) or cause.filename is None:
        return str(error)
    if cause.errno == errno.ENOENT:
        problem = "no such file"
    else:
        problem = (cause.strerror or str(cause)).lower()
    return f"--flagfile={cause.filename}: {problem}"


def _guarded(prog, main):
    def guarded(argv):
        try:
            return main(argv)
        except (Failure, app.UsageError) as error:
            _exit(prog, str(error), 1)
        except Stopped as stop:
            _exit(prog, str(stop), stop.status, label="stopped")
        except KeyboardInterrupt:
            _exit(prog, None, _INTERRUPTED)
        except BrokenPipeError as error:
            if not stdout_reader_gone():
                _unexpected(prog, error)
            discard_stdout()
            _exit(prog, None, _PIPE_CLOSED)
        except Exception as error:  # pylint: disable=broad-except
            _unexpected(prog, error)

    return guarded


def _unexpected(prog, error):
    hint = "" if _debug() else " (rerun with --debug for the traceback)"
    _exit(prog, f"{type(error).__name__}: {error_text.summary(error)}{hint}", 1)


def stdout_reader_gone():
    """Whether standard output is a pipe whose reading end was closed (poll
    reports an error on its writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def discard_stdout():
    """Sends standard output to /dev/null from here on: after its reader is
    gone, later writes (a progress line, the log's flush, the interpreter's
    at exit) would fail again."""
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def _exit(prog, message, status, label="error"):
    """Flushes the log, prints the traceback with --debug, then the line."""
    logging.flush()
    if _debug() and sys.exc_info()[0] and label == "error":
        traceback.print_exc()
    if message is not None:
        print(f"{prog}: {label}: {' '.join(message.split())}", file=sys.stderr)
    sys.stdout.flush()
    sys.exit(status)


def _debug():
    return flags.FLAGS.is_parsed() and flags.FLAGS.debug
