"""Argus services: one package per process role, each runnable as ``python -m services.<name>``."""
