"""The version of enginehouse, in a module of its own so that any package can read it without
importing the top-level package (which imports the core)."""

__version__ = "0.1.0"
