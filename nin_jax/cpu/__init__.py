"""Kernels and host settings that make NIN fast on XLA:CPU, used only on the CPU backend.

`config.run.cpu_kernels` (default on) is the one switch (`layers.model_layers` picks the model's layers by it,
`hostenv.prepare` the host settings). On TPU and GPU, and on CPU with the switch off, the
model runs flax's own convolution, dense product, pooling and BatchNorm, and the process is never re-executed.
"""
