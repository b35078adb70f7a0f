"""ttt-nn: test-time training on nearest neighbors for language models, at Pile scale."""

__version__ = "0.1.0"
