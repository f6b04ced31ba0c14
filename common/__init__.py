"""Shared building blocks of every Argus service: settings, wire messages, Redis names,
streams, logging and metrics."""
