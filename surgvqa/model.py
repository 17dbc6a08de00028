"""The graft: a frozen Whisper encoder, a trainable projector and a stock vision-language model, composed.

Shaped like transformers' Qwen2-Audio: the collator expands one ``<|audio_pad|>`` placeholder per projected
audio frame before the model; here the audio rows replace those placeholders with ``masked_scatter`` after
a count check, and the stock model itself puts the vision rows in. Both ``input_ids`` and ``inputs_embeds`` go
to it: the ids drive its image/video masks and positions (with embeds alone its multimodal rotary positions
silently fall back to 1-D ones), the embeds carry the audio rows. Logits are computed only where labels exist
(a 152k vocabulary would otherwise dominate a small model's step). What differs between model generations is
asked of the model's backbone (``surgvqa.backbones``).

Whisper runs on the real length of each question: it refuses anything but 30 s of mel frames, so for the
call its ``max_source_positions`` is shrunk and its position table sliced to the question's length
(identical to a manual forward), instead of padding to 30 s (10x slower, and attention sees the padding).

Here: ``build_model(cfg)``, ``AudioGraftedVLM`` (``model(**batch).loss``), ``collator(model)``,
``parameter_groups(model)``, ``save_checkpoint`` / ``load_checkpoint``, ``merge_for_export``, and the towers'
attention over packed sequences (``PackedAttention``: one call a layer where the stock path makes one a slice).
Running the model (answers, candidate scores) is ``surgvqa.scoring`` and ``surgvqa.inference``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from . import backbones, data
from .backbones import AUDIO_TOKEN, IM_END, Backbone
from .collate import (IGNORE_INDEX, INSTRUCTION, MEL_FRAMES_PER_ENCODER_FRAME, SPOKEN_QUESTION,
                      WRITTEN_QUESTION, Collator)
from .config import REPO_ROOT, Config
from .loop import optimizer_groups
from .whisper import encode_at_length, encode_lengths, encoder_fingerprint, load_whisper

# The tiny preset's vision-language model, pretrained on phantom clips by ``python -m surgvqa pretrain``.
TINY_PRETRAINED_DIR = REPO_ROOT / "checkpoints" / "tiny-phantom" / "vlm"
# Beside a projector trained in pretraining: the encoder, pooling and kind it was trained for.
PROJECTOR_SOURCE_FILE = "projector_source.json"

# The tiny tokenizer's vocabulary: the task's own text needs ~1k tokens instead of Qwen's 152k.
TINY_VOCAB_SIZE = 1024


def graftable(backbone: Backbone) -> Backbone:
    """The backbone, when the graft applies to it (checked from a checkpoint's config, before its weights load)."""
    if backbone.hears_natively:
        raise ValueError(f"{backbone.name} hears the question through its own audio encoder: the graft's Whisper and "
                         f"projector do not apply to it (NativeHearingVLM is its model)")
    return backbone


class AudioTokenMismatch(ValueError):
    """The audio placeholders of a sample do not match the rows its question audio projects to."""


# --- the module ------------------------------------------------------------------------------------------

class AudioProjector(nn.Module):
    """Whisper frames -> language-model rows: average pooling over time (``pool`` frames), then a linear map
    to the hidden size, or, given ``token_embeddings`` (a function returning the language model's input
    embedding matrix, read at every call so it follows the model's training), a linear map to a
    distribution over the vocabulary that mixes those embeddings: each row is then a soft token, in the
    space the language model reads written text from."""

    def __init__(self, whisper_dim: int, hidden_size: int, pool: int,
                 token_embeddings: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self.pool = pool
        self.token_embeddings = token_embeddings
        out = hidden_size if token_embeddings is None else token_embeddings().shape[0]
        self.linear = nn.Linear(whisper_dim, out)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # (batch, time, whisper_dim)
        return self.project(self.pool_frames(frames))

    def pool_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(batch, time, whisper_dim) -> (batch, time // pool, whisper_dim): the mean of each ``pool`` frames."""
        if self.pool > 1:
            frames = F.avg_pool1d(frames.transpose(1, 2), self.pool, self.pool).transpose(1, 2)
        return frames

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled Whisper frames (..., whisper_dim) -> language-model rows (..., hidden)."""
        rows = self.linear(pooled)
        if self.token_embeddings is None:
            return rows
        embeddings = self.token_embeddings()
        return rows.softmax(dim=-1).to(embeddings.dtype) @ embeddings


@dataclass
class GraftOutput:
    loss: torch.Tensor | None  # the mean cross-entropy over the label tokens (None without labels)
    # With labels: logits at the positions that predict a label, (n_label_tokens, vocab), in batch order.
    # Without: the logits of each row's last position, (batch, vocab).
    logits: torch.Tensor


class AudioGraftedVLM(nn.Module):
    clip_vision: Any = None  # the vision outputs kept per clip while it only answers (scoring.keep_clip_vision)

    def __init__(self, vlm: nn.Module, whisper: WhisperEncoder, tokenizer: Any,
                 feature_extractor: WhisperFeatureExtractor, cfg: Config, whisper_from_cfg: bool):
        super().__init__()
        self.vlm = vlm  # the backbone's model class, or a peft PeftModel around it
        self.backbone: Backbone = graftable(backbones.backbone_of(self.base_vlm))
        use_packed_attention(self.base_vlm)
        self.whisper = whisper.requires_grad_(False).eval()
        vocabulary = ((lambda: self.base_vlm.get_input_embeddings().weight) if cfg.audio_projector == "vocab"
                      else None)
        self.projector = AudioProjector(whisper.config.d_model, self.base_vlm.config.text_config.hidden_size,
                                        cfg.audio_pool, vocabulary).to(self.base_vlm.device)
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.cfg = cfg
        # False when the encoder was handed in rather than loaded from cfg.whisper: checkpoints then carry it.
        self.whisper_from_cfg = whisper_from_cfg
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.backbone.audio_placeholder)
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    @property
    def base_vlm(self) -> nn.Module:
        """The vision-language model itself (LoRA layers, when any, are injected into it in place)."""
        return self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm

    def train(self, mode: bool = True) -> "AudioGraftedVLM":
        super().train(mode)
        self.whisper.eval()  # frozen: its dropout stays off while the rest trains
        return self

    # --- audio ---

    def whisper_states(self, mel: torch.Tensor) -> torch.Tensor:
        """Whisper on mel frames of one length (batch, n_mels, T): (batch, T/2, d_model), no 30 s padding."""
        return encode_at_length(self.whisper, mel)

    def audio_rows(self, features: torch.Tensor, lengths: torch.Tensor, encoded: bool = False
                   ) -> list[torch.Tensor]:
        """Projected audio rows of each sample, (n_i, hidden) each, from log-mels (batch, n_mels, T) or,
        when ``encoded``, from cached encoder outputs (batch, T / 2, d_model); ``lengths`` in mel frames.

        Log-mels go through Whisper in one call with each sample's padding masked out of its attention
        (``whisper.encode_lengths``); the projector pools the rows of each length together.
        """
        if not encoded:
            features = encode_lengths(self.whisper, features, lengths)
        rows: list[torch.Tensor | None] = [None] * len(lengths)
        for length in lengths.unique().tolist():
            index = (lengths == length).nonzero().flatten()
            frames = features[index, : length // MEL_FRAMES_PER_ENCODER_FRAME]
            projected = self.projector(frames.to(self.projector.linear.weight.dtype))
            for i, r in zip(index.tolist(), projected):
                rows[i] = r
        return rows

    def embed(self, input_ids: torch.Tensor, audio_features: torch.Tensor | None = None,
              audio_lengths: torch.Tensor | None = None, samples: Sequence[data.Sample] | None = None,
              audio_rows: torch.Tensor | None = None, audio_encoded: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the audio placeholders replaced by projected Whisper rows.

        The audio comes as log-mels (``audio_features``) or as cached encoder outputs (``audio_encoded``).
        ``audio_rows`` (ascending batch indices) says which rows the audio features belong to when not
        every row hears its question (the mixed mode); every other row must hold no audio placeholder.
        """
        if audio_features is not None and audio_encoded is not None:
            raise ValueError("give the audio as log-mels or as encoder outputs, not both")
        encoded = audio_encoded is not None
        audio_features = audio_encoded if encoded else audio_features
        embeds = self.base_vlm.get_input_embeddings()(input_ids)
        audio_mask = input_ids == self.audio_token_id
        placeholders = audio_mask.sum(dim=1).tolist()
        names = [s.uid for s in samples] if samples else [f"row {i}" for i in range(len(input_ids))]
        if audio_features is None:
            if any(placeholders):
                bad = [n for n, c in zip(names, placeholders) if c]
                raise AudioTokenMismatch(f"audio placeholders but no audio features, sample(s) {bad}")
            return embeds
        rows = self.audio_rows(audio_features.to(embeds.device), audio_lengths.to(embeds.device), encoded)
        owners = audio_rows.tolist() if audio_rows is not None else list(range(len(input_ids)))
        if len(owners) != len(rows) or owners != sorted(set(owners)):
            raise AudioTokenMismatch(f"audio rows {owners} do not match the {len(rows)} audio features")
        expected, lengths = [0] * len(input_ids), [0] * len(input_ids)
        for owner, r, length in zip(owners, rows, audio_lengths.tolist()):
            expected[owner], lengths[owner] = len(r), length
        for name, count, n_rows, length in zip(names, placeholders, expected, lengths):
            if count != n_rows:
                raise AudioTokenMismatch(
                    f"sample {name}: {count} audio placeholder tokens but its question audio ({length} mel "
                    f"frames) gives {n_rows} rows")
        return embeds.masked_scatter(audio_mask.unsqueeze(-1), torch.cat(rows).to(embeds.dtype))

    # --- forward ---

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                audio_lengths: torch.Tensor | None = None, samples: Sequence[data.Sample] | None = None,
                audio_rows: torch.Tensor | None = None, audio_encoded: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | None = None) -> GraftOutput:
        """Mean cross-entropy over the label tokens of the batch (and their logits); see GraftOutput.
        ``second_per_grid_ts``: what a backbone's positions take beside the grids (``Backbone.clip_batch_inputs``)."""
        base = self.base_vlm
        inputs_embeds = self.embed(input_ids, audio_features, audio_lengths, samples, audio_rows, audio_encoded)
        clip_inputs = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        prompt = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids,
                  "image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw, "audio_lengths": audio_lengths,
                  **clip_inputs}
        out = base.model(**self.backbone.prompt_inputs(base, prompt, inputs_embeds), attention_mask=attention_mask,
                         mm_token_type_ids=mm_token_type_ids, pixel_values=pixel_values,
                         image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                         video_grid_thw=video_grid_thw, use_cache=False, **clip_inputs)
        hidden = out.last_hidden_state
        if labels is None:
            return GraftOutput(loss=None, logits=base.lm_head(hidden[:, -1]).float())
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not keep.any():
            raise ValueError("no label tokens in the batch (a generation batch was given for training?)")
        logits = base.lm_head(hidden[:, :-1][keep]).float()
        return GraftOutput(loss=F.cross_entropy(logits, targets[keep]), logits=logits)


class NativeHearingVLM(AudioGraftedVLM):
    """A model that hears through its own audio encoder (``Backbone.hears_natively``: Qwen2.5-Omni's thinker), in
    the graft's place: the same prompts, labels, positions, training and scoring, with the question's rows from the
    model's own encoder (frozen, as the graft's Whisper is) where the graft has Whisper and a projector. There is no
    projector, so nothing to align, and no Whisper outputs to cache."""

    def __init__(self, vlm: nn.Module, tokenizer: Any, feature_extractor: WhisperFeatureExtractor, cfg: Config):
        nn.Module.__init__(self)
        self.vlm = vlm
        self.backbone = backbones.backbone_of(self.base_vlm)
        if not self.backbone.hears_natively:
            raise ValueError(f"{self.backbone.name} does not hear by itself: it takes the graft (AudioGraftedVLM)")
        use_packed_attention(self.base_vlm)
        self.whisper = self.projector = None
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.cfg = cfg
        self.whisper_from_cfg = True  # no Whisper of its own to save
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.backbone.audio_placeholder)
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    def train(self, mode: bool = True) -> "NativeHearingVLM":
        return nn.Module.train(self, mode)

    def audio_rows(self, features: torch.Tensor, lengths: torch.Tensor, encoded: bool = False
                   ) -> list[torch.Tensor]:
        if encoded:
            raise ValueError(f"{self.backbone.name} hears through its own encoder: give it log-mels, not cached "
                             f"Whisper outputs (cache_audio_features=False)")
        return self.backbone.heard_rows(self.base_vlm, features.to(self.base_vlm.dtype), lengths)


# --- building ------------------------------------------------------------------------------------------

def build_tiny_tokenizer(cfg: Config | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the task's own text, with the tiny backbone's special tokens and chat template.

    The corpus is every question wording of both templates, every answer sentence and the prompt
    wording, so the tiny preset needs a vocabulary of ~1k instead of Qwen's 152k. Byte-level BPE decodes
    back to the exact text (answers, newlines) and still encodes any other text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = sorted(set(data.question_wordings("in", cfg).values()) | set(data.question_wordings("out", cfg).values())
                    | set(data.answer_sentences(cfg).values()))
    corpus += [INSTRUCTION, SPOKEN_QUESTION.replace(AUDIO_TOKEN, ""), WRITTEN_QUESTION.format(question=""),
               "system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = list(backbones.TINY_SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=special[0],
                                   additional_special_tokens=special[1:], chat_template=backbones.TINY.chat_template)


def _torch_dtype(cfg: Config) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def _checkpoint_backbone(name_or_path: str, cfg: Config, native: bool = False) -> Backbone:
    """A checkpoint's backbone from its config alone; with ``native`` False, refused when the graft does not apply
    to it."""
    local = cfg.local_dir(name_or_path)
    backbone = backbones.backbone_of_checkpoint(str(local or name_or_path), local_files_only=local is not None)
    return backbone if native else graftable(backbone)


def _hears_natively(name_or_path: str, cfg: Config) -> bool:
    """Whether the model a config or checkpoint names hears by itself (from its config alone; the tiny one does not)."""
    return name_or_path != "tiny" and _checkpoint_backbone(name_or_path, cfg, native=True).hears_natively


def _load_vlm(name_or_path: str, cfg: Config) -> nn.Module:
    """The vision-language model from a local folder (never touching the network) or a hub id, as the class
    its backbone names; 4-bit nf4 when asked."""
    local = cfg.local_dir(name_or_path)
    backbone = _checkpoint_backbone(name_or_path, cfg, native=True)
    quantization = None
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                          llm_int8_skip_modules=list(backbone.not_quantized))
    source = str(local or name_or_path)
    return backbone.model_class.from_pretrained(
        source, dtype=_torch_dtype(cfg), quantization_config=quantization, local_files_only=local is not None,
        **backbone.pretrained_kwargs(source, local_files_only=local is not None))


def _load_tokenizer(name_or_path: str | Path, cfg: Config, graft: bool = True) -> Any:
    """A checkpoint's tokenizer; for the graft, with the project's audio placeholder added when it lacks it."""
    local = cfg.local_dir(str(name_or_path))
    # a run's folder holds surgvqa's config.json, which transformers' check for Mistral's old pre-tokenizer reads as
    # a model config of no known type: it then warns about a regex that Qwen's tokenizer does not have
    tokenizer = AutoTokenizer.from_pretrained(str(local or name_or_path), local_files_only=local is not None,
                                              fix_mistral_regex=False)
    if graft and AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]},
                                     replace_extra_special_tokens=False)
    return tokenizer


def _whisper_encoder(whisper: nn.Module) -> WhisperEncoder:
    if isinstance(whisper, WhisperEncoder):
        return whisper
    if hasattr(whisper, "get_encoder"):  # WhisperModel / WhisperForConditionalGeneration
        return whisper.get_encoder()
    raise TypeError(f"expected a Whisper model or encoder, got {type(whisper).__name__}")


def _load_whisper_from_cfg(cfg: Config) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    whisper, processor = load_whisper(cfg.whisper, cfg)
    return _whisper_encoder(whisper), processor.feature_extractor


def _apply_training_setup(vlm: nn.Module, cfg: Config) -> nn.Module:
    """LoRA on every language-model linear layer (all else frozen), or the whole VLM trainable."""
    if cfg.gradient_checkpointing:
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        if cfg.load_in_4bit:
            raise ValueError("4-bit weights cannot be trained directly: set lora=True with load_in_4bit")
        return vlm.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    # 4-bit runs skip peft's prepare_model_for_kbit_training: with non-reentrant checkpointing (enabled
    # above) all it adds is a cast of every unquantised weight to fp32, and the vision tower, embeddings and
    # lm_head it would cast stay frozen (3.5 GB more at 7B for nothing they learn; the adapters train in fp32
    # under bf16 autocast either way).
    vlm.requires_grad_(False)
    # A random-init VLM's frozen output layer caps the logits (unit-RMS hidden states times 0.02-scale
    # weights): LoRA alone stalled at 4.14 nats a token overfitting 10 samples. There the output layer is
    # trained too (it is saved with the adapter); a pretrained lm_head stays frozen.
    train_output_layer = cfg.vlm == "tiny" and cfg.vlm_from_scratch
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=backbones.backbone_of(vlm).lora_target, bias="none",
                      modules_to_save=["lm_head"] if train_output_layer else None)
    with _peft_quiet():
        return get_peft_model(vlm, lora)


@contextlib.contextmanager
def _peft_quiet():
    # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: a FutureWarning per model wrapped
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def build_model(cfg: Config, whisper: tuple[nn.Module, WhisperFeatureExtractor] | None = None,
                device: torch.device | str | None = None) -> AudioGraftedVLM:
    """The graft for a config.

    ``cfg.vlm == "tiny"``: the small Qwen2-VL pretrained on phantom clips that ships in
    ``checkpoints/tiny-phantom`` (see its MODEL_CARD.md), or, with ``vlm_from_scratch``, a random-init one
    of the same architecture with the task tokenizer. Otherwise the model is loaded from ``cfg.vlm`` (a local
    folder or a hub id) as the class of its backbone, in 4-bit nf4 when ``load_in_4bit``. Whisper comes from
    ``surgvqa.whisper`` unless ``whisper`` gives ``(model or encoder, feature_extractor)``. Everything is placed
    on ``device`` (default: the config's, see ``Config.torch_device``).
    """
    if _hears_natively(cfg.vlm, cfg):  # before anything loads
        return place(_native_model(cfg), device)
    if whisper is None:
        encoder, feature_extractor = _load_whisper_from_cfg(cfg)
    else:
        encoder, feature_extractor = _whisper_encoder(whisper[0]), whisper[1]
    encoder = encoder.to(_torch_dtype(cfg))
    if cfg.vlm == "tiny" and cfg.vlm_from_scratch:
        if cfg.load_in_4bit:
            raise ValueError("4-bit loading needs saved weights: save the tiny model and point vlm at it")
        tokenizer = build_tiny_tokenizer(cfg)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            vlm = backbones.TINY.model_class(backbones.TINY.tiny_config(tokenizer)).to(_torch_dtype(cfg))
    else:
        source = str(TINY_PRETRAINED_DIR) if cfg.vlm == "tiny" else cfg.vlm
        if cfg.vlm == "tiny" and not (TINY_PRETRAINED_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(f"the phantom-pretrained tiny VLM is missing ({TINY_PRETRAINED_DIR}); "
                                    "restore checkpoints/ from git, or set vlm_from_scratch=True")
        tokenizer = _load_tokenizer(source, cfg)
        vlm = _load_vlm(source, cfg)
    if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(tokenizer))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = AudioGraftedVLM(_apply_training_setup(vlm, cfg), encoder, tokenizer, feature_extractor,
                                    cfg, whisper_from_cfg=whisper is None)
    if cfg.pretrained_projector and not (cfg.vlm == "tiny" and cfg.vlm_from_scratch):
        load_pretrained_projector(model)
    return place(model, device)


def hearing(cfg: Config) -> str:
    """How a config's model hears the question, in words (from the checkpoint's config alone, no weights read)."""
    if _hears_natively(cfg.vlm, cfg):
        return "through its own audio encoder (frozen): no projector to train or align, no Whisper outputs to cache"
    aligned = f", aligned for {cfg.align_steps} steps before fine-tuning" if cfg.align_steps else ""
    return f"through frozen Whisper ({cfg.whisper}) and a trained projector (pool {cfg.audio_pool}{aligned})"


def _native_model(cfg: Config) -> NativeHearingVLM:
    """A natively hearing checkpoint (``cfg.vlm``) with its own tokenizer and feature extractor."""
    if cfg.cache_audio_features:
        raise ValueError(f"{cfg.vlm} hears through its own audio encoder: there are no Whisper outputs to cache "
                         f"(set cache_audio_features=False)")
    if cfg.align_steps:
        raise ValueError(f"{cfg.vlm} hears through its own audio encoder: it has no projector to align "
                         f"(set align_steps=0)")
    local = cfg.local_dir(cfg.vlm)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(str(local or cfg.vlm),
                                                                local_files_only=local is not None)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        vlm = _apply_training_setup(_load_vlm(cfg.vlm, cfg), cfg)
    return NativeHearingVLM(vlm, _load_tokenizer(cfg.vlm, cfg, graft=False), feature_extractor, cfg)


def place(model: AudioGraftedVLM, device: torch.device | str | None = None) -> AudioGraftedVLM:
    """Whisper, the projector and the VLM on one device (default: the config's). A 4-bit VLM stays where
    bitsandbytes put it (the current CUDA device), and the rest joins it there."""
    if model.cfg.load_in_4bit:
        target = model.base_vlm.device
        for part in (model.whisper, model.projector):
            if part is not None:
                part.to(target)
        return model
    return model.to(torch.device(device) if device is not None else model.cfg.torch_device())


def on_device(batch: dict[str, Any], model: AudioGraftedVLM) -> dict[str, Any]:
    """A collated batch with its tensors on the model's device."""
    device = model.base_vlm.device

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def save_projector_source(directory: Path, whisper: str, whisper_fingerprint: str, audio_pool: int,
                          audio_projector: str) -> Path:
    """Record, beside a projector trained in pretraining, the encoder outputs it was trained on."""
    import json

    path = Path(directory) / PROJECTOR_SOURCE_FILE
    path.write_text(json.dumps({"whisper": whisper, "whisper_fingerprint": whisper_fingerprint,
                                "audio_pool": audio_pool, "audio_projector": audio_projector}, indent=2) + "\n")
    return path


def load_pretrained_projector(model: AudioGraftedVLM, directory: Path = TINY_PRETRAINED_DIR.parent,
                              whisper_fingerprint: str | None = None) -> None:
    """Load the projector pretrained with the tiny VLM, after checking that it was trained on the outputs of
    the encoder it will get (``whisper_fingerprint``; by default this model's own Whisper weights), with the
    same pooling and projector kind: any other encoder gives it other inputs."""
    import json

    from safetensors.torch import load_file

    cfg = model.cfg
    if cfg.vlm != "tiny" or cfg.vlm_from_scratch:
        raise ValueError(f"pretrained_projector: only the shipped tiny VLM (vlm='tiny', vlm_from_scratch=False) "
                         f"comes with a pretrained projector, not vlm={cfg.vlm!r}; set pretrained_projector=False")
    source_file = directory / PROJECTOR_SOURCE_FILE
    if not source_file.is_file():
        raise FileNotFoundError(f"pretrained_projector: {source_file} is missing, so {directory} holds no "
                                f"projector pretrained on heard questions")
    source = json.loads(source_file.read_text())
    ours = {"whisper_fingerprint": whisper_fingerprint or encoder_fingerprint(model.whisper),
            "audio_pool": cfg.audio_pool,
            "audio_projector": cfg.audio_projector}
    differ = {k: (source.get(k), v) for k, v in ours.items() if source.get(k) != v}
    if differ:
        raise ValueError(f"pretrained_projector: {directory / PROJECTOR_FILE} was trained for other audio "
                         f"(pretrained, this config): {differ}")
    model.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))


def collator(model: AudioGraftedVLM) -> Collator:
    """The collator that matches a model: its tokenizer, feature extractor, config and vision patching."""
    vision = model.base_vlm.config.vision_config
    return Collator.from_config(model.cfg, model.tokenizer, model.feature_extractor, backbone=model.backbone,
                                patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                                merge_size=vision.spatial_merge_size)


def parameter_groups(model: AudioGraftedVLM) -> list[dict[str, Any]]:
    """Optimizer groups of fine-tuning (``loop.optimizer_groups``): the projector at cfg.projector_lr, every
    other trainable weight at cfg.lr."""
    return optimizer_groups(model)


# --- checkpoints ---------------------------------------------------------------------------------------

PROJECTOR_FILE = "projector.safetensors"


def save_checkpoint(model: AudioGraftedVLM, directory: str | Path, cfg: Config | None = None) -> Path:
    """One folder: config.json, tokenizer, feature extractor, projector, and the VLM weights that matter.

    With LoRA: ``adapter/`` only, plus ``vlm/`` base weights when they cannot be loaded from cfg.vlm (the
    tiny random-init model). Without LoRA: ``vlm/`` in full (it was trained). ``vlm/`` is a standalone
    Qwen2-VL folder with its tokenizer, so ``vlm=<dir>/vlm`` loads it (4-bit included). ``whisper/`` is
    written only when the encoder was handed in rather than loaded from cfg.whisper.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = cfg or model.cfg
    cfg.save(directory)
    model.tokenizer.save_pretrained(directory)
    model.feature_extractor.save_pretrained(directory)
    if model.projector is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()},
                  str(directory / PROJECTOR_FILE))
    if cfg.lora:
        model.vlm.save_pretrained(directory / "adapter")
    if not cfg.lora or cfg.vlm == "tiny":
        base = model.base_vlm
        # Under LoRA the frozen layers sit at '<name>.base_layer' / '<name>.original_module' (beside the
        # adapter's own weights); write them under their stock names.
        state = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v
                 for k, v in base.state_dict().items() if "lora_" not in k and ".modules_to_save." not in k}
        base.save_pretrained(directory / "vlm", state_dict=state)
        model.tokenizer.save_pretrained(directory / "vlm")
        if model.whisper is None:  # a natively hearing model's log-mel settings belong to its folder
            model.feature_extractor.save_pretrained(directory / "vlm")
    if not model.whisper_from_cfg:
        model.whisper.save_pretrained(directory / "whisper")
    return directory


def load_checkpoint(directory: str | Path, trainable: bool = False, device: torch.device | str | None = None,
                    **overrides: Any) -> AudioGraftedVLM:
    """The model saved by save_checkpoint (same logits), placed like ``build_model``; ``overrides`` change the
    config (e.g. load_in_4bit)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_absolute() and not directory.exists():  # repository-relative, as config paths are
        directory = REPO_ROOT / directory
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint (no config.json)")
    cfg = Config.load(directory).replace(**overrides)
    vlm_source = str(directory / "vlm") if (directory / "vlm").is_dir() else cfg.vlm
    native = _hears_natively(vlm_source, cfg)
    tokenizer = _load_tokenizer(directory, cfg, graft=not native)
    if native:
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(directory), local_files_only=True)
        model = NativeHearingVLM(_checkpoint_vlm(directory, vlm_source, cfg, trainable), tokenizer, feature_extractor,
                                 cfg)
        return place(model, device)
    if (directory / "whisper").is_dir():
        encoder = WhisperEncoder.from_pretrained(str(directory / "whisper"), local_files_only=True)
        feature_extractor = WhisperFeatureExtractor.from_pretrained(str(directory), local_files_only=True)
    else:
        encoder, feature_extractor = _load_whisper_from_cfg(cfg)
    encoder = encoder.to(_torch_dtype(cfg))
    model = AudioGraftedVLM(_checkpoint_vlm(directory, vlm_source, cfg, trainable), encoder, tokenizer,
                            feature_extractor, cfg, whisper_from_cfg=not (directory / "whisper").is_dir())
    model.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
    model.projector.requires_grad_(trainable)
    return place(model, device)


def _checkpoint_vlm(directory: Path, source: str, cfg: Config, trainable: bool) -> nn.Module:
    """A checkpoint's model with its adapter (when it has one), trainable or frozen."""
    from peft import PeftModel

    vlm = _load_vlm(source, cfg)
    if not cfg.lora:
        return vlm.requires_grad_(trainable)
    vlm.requires_grad_(False)
    with _peft_quiet():
        return PeftModel.from_pretrained(vlm, str(directory / "adapter"), is_trainable=trainable)


@contextlib.contextmanager
def adapter_disabled(model: AudioGraftedVLM):
    """Within it the model is its base VLM: the LoRA adapter is switched off (no second copy is loaded), which
    is the zero-shot baseline of a LoRA run."""
    if not model.cfg.lora:
        raise ValueError("the model has no LoRA adapter to switch off")
    with model.vlm.disable_adapter():
        yield model


def merge_for_export(model: AudioGraftedVLM) -> AudioGraftedVLM:
    """Fold the LoRA adapter into the base weights (in place); save_checkpoint then writes the full VLM."""
    if not model.cfg.lora:
        raise ValueError("the model has no LoRA adapter to merge")
    if model.cfg.load_in_4bit:
        raise ValueError("merging into 4-bit weights loses precision: reload with load_in_4bit=False, then merge")
    model.vlm = model.vlm.merge_and_unload()
    model.cfg = model.cfg.replace(lora=False)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- attention over packed sequences (the vision tower's frames and windows, an audio tower's chunks) -----------

# The vision tower (and Qwen2.5-Omni's audio tower) attend within slices of one packed sequence: a frame, a
# window of patches, an audio chunk. transformers passes the packed sequence with its cu_seqlens only to attention
# functions whose name contains "flash" (is_flash_attention_requested); any other name gets one call per slice
# after a `lengths.tolist()` host sync in every layer: Qwen2.5-VL's windows make that ~50 calls a clip a layer.
PACKED_ATTENTION = "flash_api_packed_sdpa"


class PackedAttention:
    """Attention within the slices of a packed sequence in one SDPA call a layer, with no host sync.

    Slices of one length (a clip's frames) are a reshape away from a batch. Slices of different lengths (Qwen2.5-VL's
    windows, whose edge windows are smaller; clips of different sizes) are gathered into a zero-padded batch
    (slices, heads, longest, dim) whose padded keys are masked out, and scattered back: the same result as one
    call per slice.
    """

    def __init__(self) -> None:
        self.packed_calls = 0  # calls over a packed sequence: one a layer
        self.padded_calls = 0  # of those, calls whose slices differ in length

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
        heads, total, dim = query.shape[1:]  # (1, heads, tokens, dim)
        if cu_seq_lens_q is None or max_length_q is None:
            raise ValueError(f"{PACKED_ATTENTION} needs the packed sequence's cu_seq_lens and longest slice (the "
                             f"towers pass them to attention functions whose name contains 'flash')")
        self.packed_calls += 1
        slices, longest = cu_seq_lens_q.numel() - 1, int(max_length_q)
        if longest * slices == total:  # lengths sum to total and none exceeds the longest: all equal
            q, k, v = (t[0].view(heads, slices, longest, dim).transpose(0, 1) for t in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling, dropout_p=dropout)
            return out.transpose(1, 2).reshape(1, total, heads, dim), None
        self.padded_calls += 1
        starts = cu_seq_lens_q[:-1].long()
        offsets = torch.arange(longest, device=query.device)
        valid = offsets[None] < (cu_seq_lens_q[1:].long() - starts)[:, None]  # (slices, longest)
        gather = (starts[:, None] + offsets[None]).clamp(max=total - 1)
        q, k, v = (t[0][:, gather].transpose(0, 1) for t in (query, key, value))  # (slices, heads, longest, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling,
                                             dropout_p=dropout)
        tokens = torch.arange(total, device=query.device)
        owner = torch.searchsorted(cu_seq_lens_q[1:].long(), tokens, right=True)  # the slice each token is in
        return out[owner, :, tokens - starts[owner]].unsqueeze(0), None  # (1, tokens, heads, dim)


_registered: PackedAttention | None = None


def register_packed_attention() -> PackedAttention:
    """The registered packed attention (registered at the first call; its call counters are shared)."""
    global _registered
    from transformers import AttentionInterface

    if _registered is None:
        _registered = PackedAttention()
        AttentionInterface.register(PACKED_ATTENTION, _registered)
    return _registered


def set_packed_attention(base: nn.Module, name: str) -> None:
    # Read at every forward by the towers' layers; set on the config objects they hold, no re-validation.
    for tower in backbones.backbone_of(base).packed_towers(base):
        tower.config._attn_implementation = name


def use_packed_attention(base: nn.Module) -> None:
    """The towers' attention over packed sequences as ``PackedAttention`` from now on (every model the project
    builds or loads; a saved config does not record it)."""
    register_packed_attention()
    set_packed_attention(base, PACKED_ATTENTION)
