"""The one line of an exception's message that says what went wrong.

Used by the commands' error lines and by messages that quote an error
(e.g. a checkpoint that could not be read or written). No TensorFlow here.
"""

import re

# What TensorFlow wraps an op's own message in: the function and device it
# ran in, before; the op's type and name, after.
_TF_FUNCTION_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_TF_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\](\s*name:.*)?$")


def summary(error):
    """The first line of an exception's message that says what went wrong.

    TensorFlow's graph execution errors start with "Graph execution error:"
    and the Python stack of the failing op ("Detected at node ... defined
    at", then indented "File ..." lines) before the op's own message; an
    eager op's message is wrapped in `{{function_node ...}}` and `[Op:...]`,
    which are left out.
    """
    for line in str(error).splitlines():
        text = line.strip()
        if (
            text
            and line == line.lstrip()
            and not text.startswith(("Graph execution error", "Detected at node"))
        ):
            return _TF_OP_SUFFIX.sub("", _TF_FUNCTION_NODE.sub("", text)) or text
    return str(error).strip() or "(no message)"
