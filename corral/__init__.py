"""corral: run Linux commands as isolated, limited jobs, over mutual TLS."""

from __future__ import annotations

__version__ = "0.1.0"
