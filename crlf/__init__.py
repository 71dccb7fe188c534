"""crlf: Contrastive Representation Learning Framework."""

__version__ = "0.1.0"
