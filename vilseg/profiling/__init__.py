"""Peak memory, time and FLOPs against resolution (``memory``, ``models``, ``runner``, ``report``) and the
training-free architecture scores (``complexity``). Import the submodules; nothing is imported here so that the
profiler's worker processes start light."""
