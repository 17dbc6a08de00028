"""The backbone seam: the published facts of each generation, the graft asking it (never naming a generation
itself), and the package's imports flowing one way."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from surgvqa import backbones
from surgvqa.backbones import AUDIO_TOKEN, QWEN2_VL, backbone_of, backbone_of_like

PACKAGE = Path(backbones.__file__).resolve().parent


def test_qwen2_vl_published_configs_and_token_ids():
    assert QWEN2_VL.token_id("<|im_start|>") == 151644 and QWEN2_VL.token_id("<|im_end|>") == 151645
    assert QWEN2_VL.token_id("<|vision_start|>") == 151652
    assert QWEN2_VL.token_id("<|image_pad|>") == 151655 and QWEN2_VL.token_id("<|video_pad|>") == 151656
    seven = QWEN2_VL.published_config("qwen2vl-7b")
    assert (seven.text_config.hidden_size, seven.text_config.num_hidden_layers, seven.text_config.vocab_size) == (
        3584, 28, 152064)
    assert (seven.text_config.num_attention_heads, seven.text_config.num_key_value_heads) == (28, 4)
    assert seven.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (seven.vision_config.depth, seven.vision_config.embed_dim, seven.vision_config.hidden_size) == (32, 1280, 3584)
    assert (seven.image_token_id, seven.video_token_id, seven.vision_start_token_id) == (151655, 151656, 151652)
    two = QWEN2_VL.published_config("qwen2vl-2b", layers=1, vision_layers=2)
    assert (two.text_config.hidden_size, two.text_config.num_hidden_layers, two.vision_config.depth) == (1536, 1, 2)
    assert two.tie_word_embeddings and not seven.tie_word_embeddings
    # the audio placeholder is the project's own: never one of the generation's tokens
    assert AUDIO_TOKEN not in QWEN2_VL.special_tokens


def test_qwen2_5_vl_and_qwen3_vl_published_configs():
    from surgvqa.backbones import QWEN2_5_VL, QWEN3_VL

    seven = QWEN2_5_VL.published_config("qwen2.5vl-7b")
    assert (seven.text_config.hidden_size, seven.text_config.num_hidden_layers, seven.text_config.vocab_size) == (
        3584, 28, 152064)
    assert (seven.vision_config.window_size, list(seven.vision_config.fullatt_block_indexes),
            seven.vision_config.tokens_per_second, seven.vision_config.out_hidden_size) == (112, [7, 15, 23, 31], 2, 3584)
    eight = QWEN3_VL.published_config("qwen3vl-8b")
    text, vision = eight.text_config, eight.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim) == (4096, 36, 32, 8, 128)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    assert (vision.depth, vision.hidden_size, vision.patch_size, list(vision.deepstack_visual_indexes),
            vision.out_hidden_size) == (27, 1152, 16, [8, 16, 24], 4096)
    two = QWEN3_VL.published_config("qwen3vl-2b", layers=1, vision_layers=1)
    assert two.tie_word_embeddings and list(two.vision_config.deepstack_visual_indexes) == [0]
    assert (QWEN2_5_VL.token_id("<tool_call>"), QWEN3_VL.token_id("<think>"), QWEN3_VL.token_id("</think>")) == (
        151657, 151667, 151668)
    assert QWEN3_VL.image_mean == (0.5, 0.5, 0.5) and QWEN3_VL.resize_unit == 32
    assert "You are a helpful assistant" not in QWEN3_VL.chat_template


def test_a_model_and_a_dry_run_name_find_their_backbone():
    from surgvqa.model import build_tiny_tokenizer

    tiny = backbones.TINY.tiny_config(build_tiny_tokenizer())
    assert backbone_of(tiny) is QWEN2_VL and backbone_of_like("qwen2vl-2b") is QWEN2_VL
    with pytest.raises(ValueError, match="not a backbone the graft knows"):
        backbone_of(type("Config", (), {"model_type": "llama"})())
    with pytest.raises(KeyError, match="unknown --like"):
        backbone_of_like("qwen9-vl")


def test_the_lora_pattern_matches_every_language_model_linear_layer_and_nothing_else():
    pattern = re.compile(QWEN2_VL.lora_target)
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.27.mlp.down_proj"):
        assert pattern.fullmatch(name), name
    for name in ("model.visual.blocks.0.attn.qkv", "lm_head", "model.visual.merger.mlp.0",
                 "model.language_model.embed_tokens"):
        assert not pattern.fullmatch(name), name


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, at the top or inside a function."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    names.add(node.module.split(".")[0])
                else:
                    names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("surgvqa."):
                names.add(node.module.split(".")[1])
        graph[path.stem] = {n for n in names if n in modules and n != path.stem}
    return graph


def test_the_package_imports_flow_one_way():
    graph = _package_imports()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(module):] + [module]))
        if state.get(module) == 2:
            return
        state[module] = 1
        for imported in sorted(graph[module]):
            visit(imported, trail + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_nothing_outside_the_seam_names_a_generation():
    generation = re.compile(r"Qwen2VL|Qwen2_5_VL|Qwen3VL|QWEN2_VL|get_rope_index")
    named = [f"{p.name}:{i}" for p in sorted(PACKAGE.glob("*.py")) if p.name != "backbones.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if generation.search(line)]
    assert named == []


def test_building_the_model_needs_no_speech_synthesis():
    import subprocess
    import sys

    code = ("import sys, surgvqa.model, surgvqa.scoring, surgvqa.fastpath; "
            "print(sorted(m for m in ('surgvqa.tts', 'surgvqa.audio', 'surgvqa.noise') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_readme_layout_lists_every_module_after_what_it_imports():
    readme = (PACKAGE.parent / "README.md").read_text()
    listed = re.findall(r"^\| `surgvqa/(\w+)\.py`", readme[readme.index("## Layout"):], re.M)
    graph = _package_imports()
    assert sorted(listed) == sorted(m for m in graph if not m.startswith("__"))
    for i, module in enumerate(listed):
        assert graph[module] <= set(listed[:i]), f"{module} imports {graph[module] - set(listed[:i])} listed later"
