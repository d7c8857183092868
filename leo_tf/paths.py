"""Where leo_tf keeps data it makes itself."""

import os
import pathlib


def default_data_path() -> pathlib.Path:
    """A per-user cache: `$XDG_CACHE_HOME/leo_tf/data` or `~/.cache/leo_tf/data`.

    XDG_CACHE_HOME counts only when it is an absolute path, as the XDG base
    directory specification says.
    """
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # unset, empty or relative: not usable
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "leo_tf" / "data"
