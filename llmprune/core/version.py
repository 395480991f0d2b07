"""The package version (recorded in every saved checkpoint's metadata)."""

__version__ = "0.1.0"
