# ViL-T + UperNet as configs/vil_upernet_ade20k.py, with each ViL sub-block (pre-norm, mLSTM layer, residual) run
# through torch.compile: one compiled function shared by all 24 sub-blocks, compiled again for every new input shape
# (training crop, evaluation windows); inside it the layers run untiled. In training the layer recompute gives way to
# AOTAutograd's partitioner, which keeps at most 40 % of the activations the compiled blocks would keep without any
# recompute and recomputes the cheap fused element-wise work, not the matmuls. Worth it for long trainings at a fixed
# crop; the compile time, the measured step times and memory are in the README
# (benchmarks/results/speed_alternating_compiled_forms*.md, vil_speed_compiled_budget*.md, compile_budget.md).
_base_ = './vil_upernet_ade20k.py'

model = dict(backbone=dict(compile_layers=True, compile_memory_budget=0.4))
