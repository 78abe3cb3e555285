"""bnfold: train a BatchNorm character MLP, fold its BatchNorms, prove it, export, sample."""

from bnfold.version import __version__

__all__ = ["__version__"]
