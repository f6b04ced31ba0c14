"""Profiling commands: ``argus profile latency|quality`` and ``argus tiers show``."""
