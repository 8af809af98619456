"""Takakrypt: transparent, policy-driven file encryption for Linux."""

__version__ = "0.1.0"
