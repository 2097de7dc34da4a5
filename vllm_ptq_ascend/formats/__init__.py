"""Checkpoint formats -> plain per-layer plans.

Each module reads one on-disk format (compressed-tensors' ``quantization_config``, its
``transform_config``, msModelSlim's ``quant_model_description.json``) and returns plans: plain data
saying what a layer's tensors are. Nothing here imports a scheme or a kernel; ``schemes.registry``
turns a plan into the scheme that serves it.
"""
