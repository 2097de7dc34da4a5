"""Adapters that put our schemes behind other projects' interfaces (vLLM-Ascend's scheme registry)."""
