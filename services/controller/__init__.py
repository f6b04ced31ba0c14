"""The controller service: a reconcile loop that divides the live workers among tiers
and publishes the versioned allocation plan (``t2i:alloc:current``).

Entry points: ``python -m services.controller`` (``__main__.main``), ``service.run``,
``service.check``, ``argus bench solver`` (``bench``). Pure decision logic: ``load``
(arrival forecast), ``solver`` (allocation MILP), ``aligner`` (routing), ``policies`` and
``allocators`` (Argus and the baselines), ``quality`` (quality sources), ``overload``
(capacity, delays, overload). Redis side: ``observe`` (arrivals, mix, backlogs) and
``rehome`` (backlog of tiers left without workers). The plan's wire protocol is
``common.plans``, shared with the workers and the classifier.
"""
