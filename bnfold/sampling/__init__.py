"""Sampling in three parts: pure token functions (``tokens``), row state (``rows``) and the
row table (``table``), scheduled by the engine (``engine``);
:mod:`bnfold.sampling.sample` drives it."""
