"""The controller service: a reconcile loop that divides the live workers among tiers
and publishes the versioned allocation plan (``t2i:alloc:current``).

Entry points: ``python -m services.controller`` (``__main__.main``), ``service.run``,
``service.check``; policies in ``policies``; the plan's wire protocol (publish, follow)
in ``plan``, shared with the workers and the classifier.
"""
