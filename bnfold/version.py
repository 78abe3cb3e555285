"""The package version, in a leaf module so any layer can stamp it into the files it writes."""

__version__ = "0.1.0"
