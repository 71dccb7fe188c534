"""The image decoding of the folder source, kept where the Encoder and explore import it from; the folder source
itself is crlf.engine.sources.folder, its decoding crlf.engine.sources.images."""

from __future__ import annotations

from crlf.engine.sources.images import decode, printable, square

__all__ = ["decode", "printable", "square"]
