"""aattsfs: an AI-aware tiered FUSE filesystem."""

__version__ = "0.1.0"

# The FUSE passthrough hooks must be loaded before anything imports pyfuse3.
from . import passthrough as _passthrough_hooks  # noqa: E402

_passthrough_hooks.load()
