"""cxrkit: fast chest X-ray detection: decode, detect, localize. Not a medical device."""

from __future__ import annotations

__version__ = "0.1.0"
