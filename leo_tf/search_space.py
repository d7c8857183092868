"""The search space and options of `leo_tf.search`, without TensorFlow.

--space entries become Dimensions (`parse_space`) whose values are drawn
from a generator seeded with (seed, trial) (`draw_trial`); leo_tf.train's
flags are parsed from arguments apart from the process's own
(`parse_train_flags`); `check_space` validates the search's common flags
with each searched flag at its extremes. Importing this module imports no
TensorFlow, so `leo_tf.search` reports bad flags before it loads.
"""

import dataclasses
import math

import numpy as np
from absl import flags

from leo_tf import config as config_lib

KINDS = ("loguniform", "uniform", "int", "choice")
# Flags each trial's flagfile sets itself.
SEARCH_SET_FLAGS = (
    "data_path",
    "checkpoint_path",
    "evaluation_mode",
    "evaluate_after_training",
)
DEFAULT_SPACE = (
    "outer_lr:loguniform:1e-4:1e-3",
    "l2_penalty_weight:loguniform:1e-10:1e-8",
    "orthogonality_penalty_weight:loguniform:1e-3:1",
    "dropout_rate:uniform:0:0.5",
    "kl_weight:loguniform:1e-3:10",
    "encoder_penalty_weight:loguniform:1e-7:1e-4",
)


class SearchError(ValueError):
    """Bad search flags or directory; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """The search's own flags (beside every flag of leo_tf.train)."""

    search_dir: str = config_lib.option(
        None, "Directory of the search's trials and results.", path=True
    )
    num_trials: int = config_lib.option(
        20,
        "Trials to run (a rerun skips finished ones).",
        config_lib.at_least(1),
    )
    space: tuple = config_lib.option(
        None,
        "A searched flag, FLAG:loguniform:LOW:HIGH, FLAG:uniform:LOW:HIGH, "
        "FLAG:int:LOW:HIGH or FLAG:choice:V1,V2,...; repeat for each flag. "
        "Default: the authors' space (see the module docstring).",
        define=flags.DEFINE_multi_string,
    )
    evaluate_best: bool = config_lib.option(
        False, "After the search, meta-test the best trial only."
    )


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched flag: how its value is drawn.

    low, high: bounds of loguniform, uniform (floats) and int (ints) draws.
    choices: the values of a choice, as flag text.
    """

    entry: str
    flag: str
    kind: str
    parser: object = dataclasses.field(compare=False, repr=False)
    low: float = None
    high: float = None
    choices: tuple = ()

    def draw(self, rng):
        """A value drawn with the numpy Generator `rng`, as flag text."""
        if self.kind == "loguniform":
            return repr(float(np.exp(rng.uniform(np.log(self.low), np.log(self.high)))))
        if self.kind == "uniform":
            return repr(float(rng.uniform(self.low, self.high)))
        if self.kind == "int":
            return str(int(rng.integers(self.low, self.high, endpoint=True)))
        return self.choices[int(rng.integers(len(self.choices)))]

    def value(self, text):
        """The Python value of the flag text `text`."""
        return self.parser.parse(text)

    def extremes(self):
        """Flag texts of the space's corner values, to validate up front."""
        if self.kind == "choice":
            return self.choices
        render = str if self.kind == "int" else repr
        return (render(self.low), render(self.high))


def _train_flags():
    """A new FlagValues holding leo_tf.train's flags, at their defaults."""
    values = flags.FlagValues()
    config_lib.define_flags(values)
    return values


def parse_dimension(entry):
    """The Dimension of one --space entry; SearchError naming it if invalid."""

    def fail(problem):
        return SearchError(f"--space={entry}: {problem}")

    parts = entry.split(":")
    if len(parts) < 3:
        raise fail("expected FLAG:KIND:..., e.g. outer_lr:loguniform:1e-4:1e-3")
    name, kind, arguments = parts[0], parts[1], parts[2:]
    known = _train_flags()
    if name not in known:
        raise fail(f"{name} is not a flag of leo_tf.train")
    if name in SEARCH_SET_FLAGS:
        raise fail(f"--{name} is set by the search itself")
    if kind not in KINDS:
        raise fail(f"{kind} is not a kind of draw: use one of {', '.join(KINDS)}")
    parser = known[name].parser
    if kind == "choice":
        return Dimension(
            entry, name, kind, parser, choices=_choices(arguments, parser, fail)
        )
    allowed = _kinds_for(parser)
    if kind not in allowed:
        raise fail(f"--{name} can be searched by {', '.join(allowed)} only")
    if len(arguments) != 2:
        raise fail(f"{kind} takes LOW:HIGH")
    number = int if kind == "int" else float
    try:
        low, high = (number(text) for text in arguments)
    except ValueError:
        raise fail(
            f"LOW and HIGH must be {'integers' if kind == 'int' else 'numbers'}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise fail("needs finite LOW < HIGH")
    if kind == "loguniform" and low <= 0:
        raise fail("loguniform needs 0 < LOW")
    return Dimension(entry, name, kind, parser, low=low, high=high)


def _kinds_for(parser):
    """The kinds of draw a flag with this absl parser can take."""
    if isinstance(parser, flags.FloatParser):
        return ("loguniform", "uniform", "choice")
    if isinstance(parser, flags.IntegerParser):
        return ("int", "choice")
    return ("choice",)


def _choices(arguments, parser, fail):
    """The comma-separated values of a choice, each checked by the flag's parser."""
    texts = tuple(":".join(arguments).split(","))
    if any(not text for text in texts):
        raise fail("choice takes V1,V2,... with no empty value")
    for text in texts:
        try:
            parser.parse(text)
        except ValueError as error:
            raise fail(f"{text!r} is not a valid value ({error})") from None
    return texts


def parse_space(entries):
    """The Dimensions of --space entries, in order; SearchError if invalid."""
    space = tuple(parse_dimension(entry) for entry in entries)
    seen = set()
    for dimension in space:
        if dimension.flag in seen:
            raise SearchError(
                f"--space={dimension.entry}: --{dimension.flag} is searched twice"
            )
        seen.add(dimension.flag)
    return space


def draw_trial(space, seed, trial):
    """Trial `trial`'s values, {flag: text}: a pure function of its arguments."""
    rng = np.random.default_rng([seed, trial])
    return {dimension.flag: dimension.draw(rng) for dimension in space}


# --- leo_tf.train's flags, apart from the process's --------------------------------


def parse_train_flags(args):
    """leo_tf.train's flags parsed from `args` alone, in a new FlagValues.

    Args:
      args: command-line arguments, e.g. ["--flagfile=trial.cfg"].

    Returns:
      flags.FlagValues holding copies of leo_tf.train's flags; unset ones at
      their defaults.
    """
    values = _train_flags()
    try:
        values(["leo_tf.search", *args])
    except flags.Error as error:
        raise SearchError(str(error)) from None
    return values


def serialized(values):
    """leo_tf.train's flags in `values` that have a value, as arguments."""
    return [
        values[name].serialize()
        for name in config_lib.train_flag_names()
        if values[name].value is not None
    ]


def check_space(base_args, space):
    """The RunConfig of the common flags `base_args`; ConfigError or
    SearchError if they are not a valid leo_tf.train run, alone or with any
    searched flag at its extremes (both bounds, or every choice)."""
    config = config_lib.from_flags(parse_train_flags(base_args))
    for dimension in space:
        for text in dimension.extremes():
            args = [*base_args, f"--{dimension.flag}={text}"]
            try:
                config_lib.from_flags(parse_train_flags(args))
            except (config_lib.ConfigError, SearchError) as error:
                raise SearchError(f"--space={dimension.entry}: {error}") from None
    return config
