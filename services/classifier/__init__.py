"""The classifier service: decides each prompt's tier with a policy and routes it
through the controller's plan onto a tier stream.

Entry points: ``python -m services.classifier`` (``__main__.main``), ``service.run``,
``service.check``; policies in ``policies``.
"""
