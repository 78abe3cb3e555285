"""bnfold: train a BatchNorm character MLP, fold its BatchNorms, prove it, export, sample."""

__version__ = "0.1.0"
