# `make demo`: quantize the embedded SmolLM2-135M, serve it through ptq_ascend, compare with bf16.
# `make test`: the CI suite (CPU only; slow tests excluded: `make test-all` runs them).
PY := .venv/bin/python
export VLLM_PTQ_ASCEND_CACHE ?= $(CURDIR)/.cache

.PHONY: venv demo test test-all bench
venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(PY) -m vllm_ptq_ascend.demo

test: venv
	.venv/bin/ruff check vllm_ptq_ascend tests benchmarks examples
	$(PY) -m pytest -q -m "not slow and not cuda" tests

test-all: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/bench_w8a8_cpu.py
