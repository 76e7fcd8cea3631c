# ViL-T + UperNet as configs/vil_upernet_ade20k_compiled.py, but with the layer recompute itself inside the compiled
# graph (a checkpoint of the whole inner part, its matmuls included) instead of the partitioner's memory budget: the
# earlier form of the compiled config, kept for the side-by-side runs (README, speed section).
_base_ = './vil_upernet_ade20k_compiled.py'

model = dict(backbone=dict(compile_memory_budget=None))
