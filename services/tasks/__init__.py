"""Background work with arq (off the request path): completion webhooks and periodic
maintenance. Run with ``python -m services.tasks``."""
