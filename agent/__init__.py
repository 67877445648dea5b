"""Techulus Cloud worker agent: keeps this server matching the control plane's expected state."""

__version__ = "0.1.0"
