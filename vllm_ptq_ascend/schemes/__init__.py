"""Quantization schemes, one per file, all built on :class:`PtqScheme`."""

from vllm_ptq_ascend.schemes.base import PtqScheme
from vllm_ptq_ascend.schemes.flatquant import FlatQuantScheme
from vllm_ptq_ascend.schemes.w4a4_int import W4A4IntScheme
from vllm_ptq_ascend.schemes.w4a8_int import W4A8IntScheme
from vllm_ptq_ascend.schemes.w8a8_int8 import W8A8Int8Scheme
from vllm_ptq_ascend.schemes.wna16 import WNA16Scheme

__all__ = ["FlatQuantScheme", "PtqScheme", "W4A4IntScheme", "W4A8IntScheme", "W8A8Int8Scheme", "WNA16Scheme"]
