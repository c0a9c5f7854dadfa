"""teeflow: multi-party computation in trusted execution environments."""

__version__ = "0.1.0"
