"""Peak memory, time and FLOPs against resolution, and the training-free architecture scores.

``names`` (the model vocabulary: short names for the shipped configs), ``models`` (building them), ``memory``
(the trackers), ``settings`` (the run's options), ``worker`` (one measurement in its own process), ``sweep`` (the
sizes, the processes, the out-of-memory search), ``fits``, ``report`` (CSV, JSON, plot, tables, Markdown),
``complexity`` (As-ViT's scores) and ``timing`` (variants timed in interleaved rounds, for the A/B benchmarks).
Import the submodules; nothing is imported here so that the worker processes start light."""
