"""The GPU worker: one process per GPU, serving the tier the controller's plan assigns.

Entry points: ``python -m services.worker`` (``__main__.main``), ``service.run`` and
``service.check``; the loop itself is ``worker.Worker``.
"""
