"""The data sources' public names, kept where the rest of crlf (and its users) import them from; the sources
themselves live in crlf.engine.sources."""

from __future__ import annotations

from crlf.engine.sources import ImageSet, load, pick, short_reason
from crlf.engine.sources.arrays import FREE_CLASSES, label_bound_problem
from crlf.engine.sources.base import resize

__all__ = ["FREE_CLASSES", "ImageSet", "label_bound_problem", "load", "pick", "resize", "short_reason"]
