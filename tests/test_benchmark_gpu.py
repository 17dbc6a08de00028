"""The GPU benchmark's CPU smoke mode: every section runs at tiny shapes and its fast paths compute the
project's function (same greedy tokens as transformers' generate, same scores as score_candidates)."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("benchmark_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("benchmark")
    returned = module.main(["--smoke", "--out", str(out)])
    written = json.loads((out / "gpu-smoke.json").read_text())
    assert written["summary"] == json.loads(json.dumps(returned["summary"]))
    return written


def test_every_section_has_positive_numbers(results):
    assert results["errors"] == []
    assert results["meta"]["copy_bandwidth_gb_s"] > 0 and results["meta"]["matmul_tflop_s"] > 0
    for section, key in (("query", "query_ms"), ("eval", "samples_per_s"), ("train", "ms_per_sample")):
        assert results[section], f"section {section} is empty"
        assert all(row[key] > 0 for row in results[section]), section
    assert {r["lever"].split(":")[0] for r in results["query"]} >= {"stock (original layout)", "kernels"}
    assert any(r["lever"].startswith("stock") for r in results["train"])
    for key in ("query_speedup", "eval_speedup", "train_speedup"):
        assert results["summary"][key] > 0


def test_fast_paths_match_the_project(results):
    checks = results["checks"]
    assert checks["static_decode_token_agreement"] == 1.0
    assert checks["clip_attention_logprob_rel_diff"] < 1e-4
    assert checks["scoring_max_abs_diff"] < 1e-3 * max(1.0, checks["scoring_reference_scale"])
    # the graphed path (positions ahead, audio rows by index, graphs on CUDA) scores what the shared-prefix
    # scorer does
    assert checks["graphed_scoring_max_abs_diff"] < 1e-3 * max(1.0, checks["scoring_reference_scale"])
    # the path notebooks 05 and 07 take (surgvqa.inference.answer_and_score) against the fast path with graphs off
    assert checks["inference_path_answer_agreement"] == 1.0 and checks["inference_path_label_agreement"] == 1.0
    assert checks["inference_path_scoring_max_abs_diff"] < 1e-3 * max(1.0, checks["scoring_reference_scale"])
    assert any(r["lever"].startswith("05's path") for r in results["eval"])


def test_fewer_tokens_in_the_project_layout(results):
    tokens = {r["lever"]: r["tokens"] for r in results["query"]}
    assert tokens["+ video pathway"] < tokens["+ trimmed, pooled audio"] < tokens["stock (original layout)"]


def test_the_tower_benchmark_times_both_paths_of_every_tower(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_towers", SCRIPT.parent / "towers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "towers.json"
    module.main(["--smoke", "--likes", "qwen2.5vl-7b,qwen2.5-omni-7b", "--clips", "2", "--frame-size", "56",
                 "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["like"], r["tower"]) for r in rows] == [("qwen2.5vl-7b", "visual"), ("qwen2.5-omni-7b", "visual"),
                                                       ("qwen2.5-omni-7b", "audio_tower")]
    for r in rows:
        assert r["stock_ms"] > 0 and r["packed_ms"] > 0
        assert r["packed_calls_per_layer"] == 1  # the packed path ran, one call a layer
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["output_abs_mean"])
