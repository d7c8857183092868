"""leo_tf's tests: one module per library module, and end-to-end commands.

leo_tf is imported before any test module imports TensorFlow, so that the
TensorFlow kernels leo_tf chooses at import (leo_tf/__init__.py) are those
tested.
"""

import importlib

importlib.import_module("leo_tf")
