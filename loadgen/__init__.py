"""Argus load generator: replay real arrival traces against the gateway and inspect Redis.

Modules: :mod:`loadgen.traces` (read and scale traces), :mod:`loadgen.prompts` (prompt
sets), :mod:`loadgen.replay` (the open-loop replay engine), :mod:`loadgen.summary`
(metrics over request records), :mod:`loadgen.inspector` (operator view of Redis), and
the ``loadgen`` CLI in :mod:`loadgen.__main__`.
"""
