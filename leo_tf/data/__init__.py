"""Embedding pickles -> per-class arrays -> N-way K-shot episodes."""
