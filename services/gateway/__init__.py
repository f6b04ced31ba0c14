"""The Argus HTTP gateway: async job API, OpenAI-compatible images API, health and metrics.

Build the ASGI app with :func:`services.gateway.app.create_app`; run it as
``python -m services.gateway``. The HTTP surface is documented in ``docs/api.md``.
"""
