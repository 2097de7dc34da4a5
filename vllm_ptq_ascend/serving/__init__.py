"""The vLLM glue: the ``ptq_ascend`` QuantizationConfig, the linear method that hands each layer to
its scheme, and the online rotations wrapped around it. Checkpoint reading is in ``formats/``,
the layer math in ``schemes/`` and ``kernels/``."""
