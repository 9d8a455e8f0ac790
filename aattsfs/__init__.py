"""aattsfs: an AI-aware tiered FUSE filesystem."""

__version__ = "0.1.0"
