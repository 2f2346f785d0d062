"""This release's version: a leaf module, so that any layer may name its release in a message."""

__version__ = "0.1.0"
