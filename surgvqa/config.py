"""One config object for the whole study, with named presets, and the settings phantom pretraining adds to it.

Every run saves its config (``config.json``) beside what it writes, so a result can always be traced
back to the exact settings. Unknown keys raise: a typo in an override must never be silently ignored.
Every command takes ``-p key=value``; ``python -m surgvqa pretrain`` reads Config keys and ``PretrainSettings``
from the same ``-p`` (no name is both).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = "tiny"
# TTS engines that may voice a split (surgvqa.tts.ENGINES less flite, which only the unseen-engine check uses)
POOL_ENGINES = ("espeak-ng", "piper", "edge-tts")
# The task's vocabulary: the 20 question types of SurgViVQA (surgvqa.data reads their label sets from the data).
# Here, below the data, because a pretraining setting (question_types) is checked against them.
QUESTION_TYPES: tuple[str, ...] = (
    "mucosa_visibility", "tool_identification", "tool_catheter_check", "endoscope_visibility",
    "nbi_status", "lighting_mode", "blue_dye_presence", "occlusion_check", "fluid_occlusion_level",
    "scope_motion", "scope_forward_motion", "scope_backward_motion", "scope_outside", "flush_action",
    "scope_motion_type", "lesion_histology_extended", "lesion_size_range", "lesion_site",
    "lesion_screen_position", "lesion_motion_direction",
)


@dataclass
class Config:
    preset: str = DEFAULT_PRESET
    seed: int = 0

    # --- data -------------------------------------------------------------------------------------
    data_dir: str = "data/raw/surgvivqa"
    template: str = "out"  # question wording: "in" or "out" template
    split: str = "published"  # "published" (shipped files) or "stratified" (made by make_split)
    split_seed: int = 42
    trainval_videos: tuple[str, ...] = ("002-001", "002-002", "002-003")
    test_video: str = "002-004"
    eval_fraction: float = 0.15

    # --- frames -----------------------------------------------------------------------------------
    frames_source: str = "phantom"  # "phantom" (rendered) or "real" (REAL-Colon JPEGs)
    frames_dir: str = "data/raw/frames"
    frame_size: int = 224
    frames_as: str = "video"  # "video" (one clip, temporal patches) or "images" (one image a frame)
    # frames a clip is seen through: the annotation's 8 (every 4th frame of the recording), or 16, which adds the
    # frame halfway after each of them (REAL-Colon keeps every frame; data.clip_frames)
    clip_frames: int = 8
    phantom_seed: int = 0
    phantom_cache_dir: str = ""  # empty: render on the fly, no disk cache

    # --- audio ------------------------------------------------------------------------------------
    tts_engine: str = "espeak-ng"  # the engine of the train, eval and test voice pools
    # engines whose voices join the train pool only: a one-speaker engine (piper's offline voice) cannot be split
    # into disjoint pools, so it widens what training hears while the test voices stay ``tts_engine``'s unheard ones
    extra_train_engines: tuple[str, ...] = ()
    # each train question is said at its own rate (x0.85-1.2 of its speaker's) and pitch (+-10 of 0-99)
    voice_perturbation: bool = False
    # the share of train questions heard through operating-room noise (surgvqa.noise: babble, monitor beeps,
    # suction hiss, broadband noise at -5 to 25 dB SNR, or room reverberation), drawn per question
    train_noise: float = 0.0
    # "template": every split asks in ``template``'s wording; "bank": each train question is asked in one of its
    # type's train wordings (the paraphrase bank's and both templates'), eval and test keep ``template``'s
    train_wordings: str = "template"
    # with train_wordings="bank": this many more wordings of each type, made from its train wordings alone by
    # dropping words and joining the start of one to the end of another (data.wording_variants)
    wording_variants: int = 0
    audio_dir: str = "data/interim/audio"
    sample_rate: int = 16000
    disjoint_voices: bool = True  # train, eval and test voices come from disjoint pools
    whisper: str = "tiny.en"  # "tiny.en" / "base" (offline packages), a local folder or a hub id
    min_audio_s: float = 0.3
    # training reads the frozen Whisper encoder's output from this cache (computed once per audio file)
    # instead of running the encoder every step; False runs it every step
    cache_audio_features: bool = True
    audio_features_dir: str = "data/interim/audio_features"
    max_audio_s: float = 15.0

    # --- model ------------------------------------------------------------------------------------
    vlm: str = "tiny"  # "tiny" (built locally) or a local folder / hub id of a Qwen2-VL checkpoint
    vlm_from_scratch: bool = False  # tiny only: random init instead of the shipped phantom-pretrained weights
    # where the model, Whisper and every batch live: "auto" (the GPU when there is one), "cpu" or "cuda"
    device: str = "auto"
    # inference on CUDA (notebooks 05 and 07, training-time evaluation): the prompt through stock Qwen2-VL with
    # batched clip attention, then candidate scoring and greedy decoding over a static KV cache, decoding
    # replayed as a CUDA graph (surgvqa.fastpath); False: the plain path, which a CPU always runs
    fast_inference: bool = True
    # "audio" (heard only), "text", "both"; "mixed" trains on all three (drawn per item) so that one model
    # is evaluated under each mode
    question_mode: str = "audio"
    audio_pool: int = 2  # average pooling of Whisper frames before the projector: 1, 2, 4, 8 or 16
    # "linear": rows = a linear map of the pooled frames; "vocab": rows = mixtures of the language model's
    # token embeddings (a softmax over the vocabulary), read like written tokens
    audio_projector: str = "linear"
    # tiny only: start the projector from the one pretrained with the tiny VLM on heard questions
    # (checkpoints/tiny-phantom/projector.safetensors; same Whisper weights, pool and kind, checked).
    # With vlm_from_scratch there is no pretrained model, and everything starts random.
    pretrained_projector: bool = False
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    load_in_4bit: bool = False
    # recompute each decoder layer's activations in the backward pass (non-reentrant, so DDP and frozen
    # inputs work) instead of keeping them: the real presets' memory saver
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # "float32" or "bfloat16"

    # --- training ---------------------------------------------------------------------------------
    output_dir: str = "data/processed/run"
    lr: float = 1e-3
    projector_lr: float = 1e-3
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 600
    warmup_steps: int = 30
    # projector alignment before fine-tuning (surgvqa.align): steps of batch_size heard train questions, only the
    # projector training, distilled from the language model's own answer to the written question; 0: none
    align_steps: int = 0
    schedule: str = "cosine"
    eval_every: int = 100
    eval_limit: int = 0  # 0: the whole eval split
    early_stop_metric: str = "eval_accuracy"
    # training batches of questions of similar length (drawn in windows of 50 batches, their order shuffled), so that
    # less of each batch is padding; off, batches are drawn at random. Either way an epoch depends only on
    # (seed, epoch) and a resumed run sees the same batches
    group_by_length: bool = False
    # the longest answer greedy decoding may write, in tokens (end of turn included); a trained model stops at its
    # end-of-turn token before (the data's longest answer sentence is 12 tokens in Qwen's vocabulary:
    # data.longest_answer_tokens), so only an untrained model's answers reach it
    max_answer_tokens: int = 32
    patience: int = 3
    # workers that decode frames and collate the next batch while the model runs this one (real JPEGs: enough
    # that decoding never bounds a GPU step): DataLoader processes in training, threads in evaluation (a
    # notebook kernel cannot fork); 0 decodes in the main process
    num_workers: int = 0
    # the accelerate config training is launched with (repository-relative); empty: a plain process
    accelerate_config: str = ""
    limit_train: int = 0  # 0: all training rows (a smoke run uses a few)
    limit_test: int = 0
    # where training, alignment and pretraining log their scalars besides the CSV, through accelerate's trackers:
    # "tensorboard" (<output_dir>/tb), "wandb" (pip install -e .[wandb]; WANDB_MODE=offline keeps the run in
    # <output_dir>/wandb until `wandb sync`), both ("tensorboard,wandb") or "none"
    report_to: str = "tensorboard"

    def __post_init__(self) -> None:
        _check_types_and_ranges(self, _RANGES, "config")
        self.trainval_videos = tuple(self.trainval_videos)
        self.extra_train_engines = tuple(self.extra_train_engines)
        choices = {
            "template": ("in", "out"),
            "split": ("published", "stratified"),
            "frames_source": ("phantom", "real"),
            "frames_as": ("video", "images"),
            "clip_frames": (8, 16),
            "question_mode": ("audio", "text", "both", "mixed"),
            "audio_pool": (1, 2, 4, 8, 16),
            "audio_projector": ("linear", "vocab"),
            "dtype": ("float32", "bfloat16"),
            "schedule": ("cosine", "linear"),
            "device": ("auto", "cpu", "cuda"),
            "train_wordings": ("template", "bank"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key}={getattr(self, key)!r}: must be one of {allowed}")
        if not set(self.trackers()) <= set(TRACKERS) or (self.report_to != "none" and not self.trackers()):
            raise ValueError(f"config report_to={self.report_to!r}: 'none' or a comma-separated choice of {TRACKERS}")
        for engine in self.extra_train_engines:
            if engine not in POOL_ENGINES or engine == self.tts_engine:
                raise ValueError(f"config extra_train_engines={list(self.extra_train_engines)}: each must be one of "
                                 f"{POOL_ENGINES} other than tts_engine={self.tts_engine!r} (flite is held out for the "
                                 f"unseen-engine check and never trains)")
        if self.tts_engine not in POOL_ENGINES:
            raise ValueError(f"config tts_engine={self.tts_engine!r}: must be one of {POOL_ENGINES} (flite is held "
                             f"out for the unseen-engine check)")
        if self.wording_variants and self.train_wordings != "bank":
            raise ValueError(f"config wording_variants={self.wording_variants} makes more train wordings from the "
                             f"paraphrase bank's: it needs train_wordings='bank', not {self.train_wordings!r}")
        if self.vlm_from_scratch and self.vlm != "tiny":
            raise ValueError(f"config vlm_from_scratch=True builds the tiny VLM from scratch; vlm={self.vlm!r} is "
                             f"loaded from its checkpoint (for random weights at real shapes: python -m surgvqa "
                             f"make-checkpoint)")

    def trackers(self) -> list[str]:
        """The trackers ``report_to`` names, in order, without repeats."""
        names = [] if self.report_to == "none" else [t.strip() for t in self.report_to.split(",")]
        return [t for i, t in enumerate(names) if t and t not in names[:i]]

    def path(self, value: str) -> Path:
        """Resolve a config path: relative paths are relative to the repository root."""
        p = Path(value)
        return p if p.is_absolute() else REPO_ROOT / p

    def local_dir(self, name_or_path: str) -> Path | None:
        """The local model folder ``name_or_path`` names (absolute or repository-relative), or None for a hub id."""
        for candidate in (Path(name_or_path), self.path(name_or_path)):
            if candidate.is_dir():
                return candidate
        return None

    def torch_device(self) -> "torch.device":
        """The device the model and its batches live on (``device``; "auto": the GPU when there is one)."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("config device='cuda' but no CUDA GPU is available (device='auto' uses the CPU then)")
        return torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / "config.json"
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls(**_checked(_without_removed(json.loads(path.read_text()), str(path)), source=str(path)))

    def replace(self, **overrides: Any) -> "Config":
        return dataclasses.replace(self, **_checked(overrides, source="overrides"))


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPE_WORDS = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a finite number",
               "tuple": "a list"}
_TYPE_CHECKS = {"str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
                "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                "tuple": lambda v: isinstance(v, (tuple, list))}


def _check_types_and_ranges(values: Any, ranges: dict[str, tuple[float | None, float | None]], what: str) -> None:
    """Every field of the dataclass ``values`` has its type (an int is accepted for a float, a bool is never a
    number; ``X | None`` also takes None) and lies in its range; one error names the key, the value and what is
    allowed."""
    for field in dataclasses.fields(values):
        name, value, kind = field.name, getattr(values, field.name), str(field.type)
        if kind.endswith(" | None"):
            if value is None:
                continue
            kind = kind.removesuffix(" | None")
        kind = kind.split("[")[0]
        if not _TYPE_CHECKS[kind](value):
            raise ValueError(f"{what} {name}={value!r}: must be {_TYPE_WORDS[kind]}")
        low, high = ranges.get(name, (None, None))
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{what} {name}={value!r}: must be {bounds}")


# (lowest, highest) allowed; None: unbounded. Rates and counts that must be positive start above 0.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seed": (0, None), "split_seed": (0, None), "phantom_seed": (0, None), "eval_fraction": (0.01, 0.99),
    "frame_size": (28, 4096), "sample_rate": (8000, 48000), "min_audio_s": (0.05, None), "max_audio_s": (0.1, 30.0),
    "lora_r": (1, None), "lora_alpha": (1, None), "lora_dropout": (0.0, 0.99),
    "lr": (0.0, 1.0), "projector_lr": (0.0, 1.0), "batch_size": (1, None), "grad_accum": (1, None),
    "max_steps": (1, None), "warmup_steps": (0, None), "eval_every": (1, None), "eval_limit": (0, None),
    "patience": (1, None), "max_answer_tokens": (1, 512), "num_workers": (0, 256), "limit_train": (0, None),
    "limit_test": (0, None), "train_noise": (0.0, 1.0), "align_steps": (0, None),
    "wording_variants": (0, 200),
}


# Options no result needs any more, removed after commit 91006da (docs/HISTORY.md has what they bought), and the
# value at which a run saved before then behaved as runs do now.
TRACKERS = ("tensorboard", "wandb")
REMOVED_KEYS: dict[str, Any] = {"distill_weight": 0.0, "mixed_weights": [1.0, 1.0, 1.0], "phantom_extra_per_epoch": 0}


def _without_removed(values: dict[str, Any], source: str) -> dict[str, Any]:
    """A saved config without the removed keys, when they hold the value runs now behave as (``wandb``, a switch
    that only chose where scalars were logged, reads as ``report_to``)."""
    if "wandb" in values:
        values = {k: v for k, v in values.items() if k != "wandb"} | (
            {"report_to": "tensorboard,wandb"} if values["wandb"] and "report_to" not in values else {})
    changed = {k: values[k] for k in REMOVED_KEYS if k in values and values[k] != REMOVED_KEYS[k]}
    if changed:
        raise ValueError(f"{source} was saved with {changed}: options removed after commit 91006da, so this "
                         f"version cannot reproduce that run (check that commit out for it)")
    return {k: v for k, v in values.items() if k not in REMOVED_KEYS}


def _checked(values: dict[str, Any], source: str, known=_FIELDS, what: str = "config key(s)") -> dict[str, Any]:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KeyError(f"unknown {what} in {source}: {unknown}; known keys: {sorted(known)}")
    return values


_REAL: dict[str, Any] = dict(frames_source="real", whisper="openai/whisper-large-v3-turbo", frame_size=392, lora=True,
                             dtype="bfloat16", lr=1e-4, projector_lr=1e-4, max_steps=3000, eval_every=200,
                             audio_pool=4, tts_engine="edge-tts", num_workers=8, gradient_checkpointing=True,
                             group_by_length=True, voice_perturbation=True, train_noise=0.5, train_wordings="bank",
                             align_steps=500)


def _real(name: str, vlm: str, accelerate: str = "1gpu-bf16", **values: Any) -> dict[str, Any]:
    """A real preset: its model, its accelerate config (configs/accelerate/), its own output folder."""
    return {**_REAL, "output_dir": f"data/processed/{name}", "vlm": vlm,
            "accelerate_config": f"configs/accelerate/{accelerate}.yaml", **values}


_NATIVE: dict[str, Any] = dict(cache_audio_features=False, align_steps=0)


PRESETS: dict[str, dict[str, Any]] = {
    # The offline default: phantom frames, espeak-ng voices, Whisper tiny.en, tiny Qwen2-VL; 2 CPU cores.
    # The pretrained tiny VLM saw 112 px clips, its questions read, heard, and both (pooled by 16 Whisper frames,
    # 0.32 s, through a projector whose rows mix the model's own token embeddings); fine-tuning starts from
    # that projector too. "mixed" trains one model that 05-evaluate then runs with the question heard, read,
    # or both. Training reads cached Whisper outputs. A low learning rate keeps what pretraining built
    # (on the stage-3 checkpoint, 3e-4 cost 2.5 points heard). docs/HISTORY.md: what each step bought.
    # 100 steps: at 300 the best checkpoint was step 100's, at 150 and at 100 (evaluated every 50) step 50's, with
    # every 05 accuracy within its interval of 300's (docs/HISTORY.md).
    "tiny": dict(frame_size=112, question_mode="mixed", lr=3e-5, projector_lr=1e-4, max_steps=100,
                 warmup_steps=20, eval_every=50, eval_limit=200, audio_pool=16, audio_projector="vocab",
                 pretrained_projector=True, extra_train_engines=("piper",), voice_perturbation=True,
                 train_noise=0.5, train_wordings="bank"),
    # A few samples and steps: what the tests and a quick look run.
    "smoke": dict(frame_size=64, batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, eval_limit=8,
                  limit_train=16, limit_test=16, output_dir="data/processed/smoke"),
    # Real study on a user's GPU box: real frames, real checkpoints (local folder or hub id), the original
    # study's neural voices (edge-tts needs Microsoft's service; offline: -p tts_engine=espeak-ng), frames
    # decoded by DataLoader workers.
    "qwen2vl-2b": _real("qwen2vl-2b", "Qwen/Qwen2-VL-2B-Instruct", batch_size=4, grad_accum=4),
    "qwen2vl-7b": _real("qwen2vl-7b", "Qwen/Qwen2-VL-7B-Instruct", batch_size=2, grad_accum=8),
    # 4-bit nf4 QLoRA on two 24 GB cards (launched with accelerate, configs/accelerate/2gpu-ddp.yaml).
    # Gradient checkpointing is on only where a preset was not measured to fit without it: capped to their cards
    # (benchmarks/memory.py, benchmarks/results/h200-memory.json), these two fit with it off (15.7 of 21 GiB, 67.7
    # of 70 GiB peak allocated, questions up to 4.7 s) and train 2.3x and 1.8x faster per sample.
    "qlora-2x24gb": _real("qlora-2x24gb", "Qwen/Qwen2-VL-7B-Instruct", "2gpu-ddp", load_in_4bit=True, batch_size=1,
                          grad_accum=8, gradient_checkpointing=False),
    # bf16 LoRA on one 80-141 GB card.
    "bf16-lora-1gpu": _real("bf16-lora-1gpu", "Qwen/Qwen2-VL-7B-Instruct", batch_size=8, grad_accum=2,
                            gradient_checkpointing=False),
    # The later generations (surgvqa.backbones): Qwen2.5-VL-7B on one large card; Qwen3-VL-2B on one 24 GB card,
    # Qwen3-VL-8B in bf16 on one 80 GB card or in 4-bit on two 24 GB cards (the original study's hardware).
    "qwen25vl-7b": _real("qwen25vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", batch_size=2, grad_accum=8),
    "qwen3vl-2b": _real("qwen3vl-2b", "Qwen/Qwen3-VL-2B-Instruct", batch_size=4, grad_accum=4),
    "qwen3vl-8b": _real("qwen3vl-8b", "Qwen/Qwen3-VL-8B-Instruct", batch_size=8, grad_accum=2),
    "qwen3vl-8b-qlora-2x24gb": _real("qwen3vl-8b-qlora-2x24gb", "Qwen/Qwen3-VL-8B-Instruct", "2gpu-ddp",
                                     load_in_4bit=True, batch_size=1, grad_accum=8),
    # The model that hears natively (Qwen2.5-Omni's thinker), the baseline the graft must beat: LoRA on its language
    # model only; its own audio encoder has no Whisper outputs to cache and no projector to align. 7B in bf16 on one
    # 80 GB card or in 4 bit on two 24 GB cards; 3B on one 24 GB card.
    "omni-7b": _real("omni-7b", "Qwen/Qwen2.5-Omni-7B", batch_size=8, grad_accum=2, **_NATIVE),
    "omni-7b-qlora-2x24gb": _real("omni-7b-qlora-2x24gb", "Qwen/Qwen2.5-Omni-7B", "2gpu-ddp", load_in_4bit=True,
                                  batch_size=1, grad_accum=8, **_NATIVE),
    "omni-3b": _real("omni-3b", "Qwen/Qwen2.5-Omni-3B", batch_size=4, grad_accum=4, **_NATIVE),
}
# Stage 0 (``python -m surgvqa pretrain``): the tiny graft from random weights on random phantom clips, questions
# written (and, with a heard bank, heard); clips per step, steps, learning rates and workers of pretraining.
PRESETS["phantom-pretrain"] = dict(PRESETS["tiny"], question_mode="text", vlm_from_scratch=True,
                                   pretrained_projector=False, batch_size=64, max_steps=2000, lr=1e-3,
                                   projector_lr=1e-3, warmup_steps=100, eval_every=500, num_workers=4)


def get_config(preset: str | None = None, **overrides: Any) -> Config:
    """The config of a named preset (the offline default when none is given) with overrides applied."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    return Config(**_checked({**values, "preset": name}, source=f"preset {name!r}"))


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings from the command line as a dict, each value JSON where it parses as JSON, else the
    string; the keys are unchecked (config keys and notebook parameters alike: whoever takes them checks)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def parse_overrides(pairs: list[str], pretraining: bool = False) -> dict[str, Any]:
    """``parse_pairs`` where every key is a Config key, or with ``pretraining`` also a pretraining setting
    (``pretrain_config`` splits them)."""
    out = parse_pairs(pairs)
    if pretraining:
        _checked(out, "command line", _PRETRAIN_KEYS, _PRETRAIN_KEYS_ARE)
    else:
        _checked(out, source="command line")
    return out


def format_override(key: str, value: Any) -> str:
    """``key=value`` as ``parse_overrides`` reads it back: a string bare unless it would read as JSON."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return f"{key}={value}"
    return f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"


# --- phantom pretraining ---------------------------------------------------------------------------

@dataclass
class PretrainSettings:
    """What pretraining needs beside its Config (the ``phantom-pretrain`` preset: frame_size, a multiple of 28
    so that clips are rendered at the size patched; batch_size in clips, each giving ~14 single-turn rows;
    max_steps, lr, projector_lr, warmup_steps, eval_every, num_workers). Checked as Config is."""
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    data_seed: int = 1  # training clips: random_clip_samples(seed=data_seed)
    heldout_seed: int = 2  # held-out clips: another seed, so other states and other renderings
    heldout_clips: int = 200
    eval_rows: int = 0  # rows of the published eval split to score (0: all)
    eval_batch_size: int = 64
    log_every: int = 25
    lesion_share: float = 0.5  # share of lesion clips per batch (curriculum; 0: the prior's mix)
    max_minutes: float = 0.0  # 0: no limit; else training stops in time for the final evaluation
    question_types: str = ""  # comma-separated question types to train on (empty: all)
    # Heard questions: a HeardBank file (``python -m surgvqa heard-bank``) and the probability that a question
    # of a clip gets, beside its written row, a row where it is heard (audio-only prompt, a train voice).
    heard_bank: str = ""
    heard_share: float = 0.0
    # the probability that a question also gets a row where it is heard AND written (the "both" prompt)
    both_share: float = 0.0
    # a checkpoint folder whose projector starts training (its projector_source.json must name the bank's
    # encoder fingerprint and pooling); empty: a random projector
    projector_from: str = ""
    # bf16 autocast on CUDA. Off by default: the tiny model is launch-bound, so fp32 (TF32 matmuls) costs
    # little, and in bf16 some batches gave non-finite gradients (435 of 3,678 steps were skipped once).
    bf16: bool = False
    compile: bool = False  # torch.compile the language model (static shapes: rows padded to 64 multiples)
    # Model dimensions over the tiny backbone's tiny_config (None: keep its value).
    vision_depth: int | None = None
    vision_embed: int | None = None
    text_layers: int | None = None
    text_ffn: int | None = None

    def __post_init__(self) -> None:
        _check_types_and_ranges(self, _PRETRAIN_RANGES, "pretraining setting")
        _ = self.question_type_list  # an unknown type raises here, before anything is built
        # heard rows and a continued projector read a bank's pooled encoder outputs (the encoder is never run)
        for name in ("heard_share", "both_share", "projector_from"):
            if getattr(self, name) and not self.heard_bank:
                raise ValueError(f"pretraining setting {name}={getattr(self, name)!r}: needs a heard bank's audio "
                                 f"(set heard_bank)")

    @property
    def question_type_list(self) -> tuple[str, ...] | None:
        names = tuple(t.strip() for t in self.question_types.split(",") if t.strip())
        unknown = [t for t in names if t not in QUESTION_TYPES]
        if unknown:
            raise ValueError(f"pretraining setting question_types={self.question_types!r}: unknown question types "
                             f"{unknown}; known: {QUESTION_TYPES}")
        return names or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "PretrainSettings":
        return dataclasses.replace(self, **_checked(overrides, "overrides", _PRETRAIN_FIELDS, "pretraining setting(s)"))


_PRETRAIN_FIELDS = {f.name: f for f in dataclasses.fields(PretrainSettings)}
_PRETRAIN_RANGES: dict[str, tuple[float | None, float | None]] = {
    "min_lr_ratio": (0.0, 1.0), "weight_decay": (0.0, None), "data_seed": (0, None), "heldout_seed": (0, None),
    "heldout_clips": (1, None), "eval_rows": (0, None), "eval_batch_size": (1, None), "log_every": (1, None),
    "lesion_share": (0.0, 1.0), "max_minutes": (0.0, None), "heard_share": (0.0, 1.0), "both_share": (0.0, 1.0),
    "vision_depth": (1, None), "vision_embed": (1, None), "text_layers": (1, None), "text_ffn": (1, None),
}
if set(_PRETRAIN_FIELDS) & set(_FIELDS):  # one -p namespace: a name must say which of the two it sets
    raise RuntimeError(f"names both a Config key and a pretraining setting: {set(_PRETRAIN_FIELDS) & set(_FIELDS)}")
_PRETRAIN_KEYS = {**_FIELDS, **_PRETRAIN_FIELDS}  # what pretraining's -p takes
_PRETRAIN_KEYS_ARE = "key(s) (neither a config key nor a pretraining setting)"


def pretrain_config(values: dict[str, Any], source: str = "command line") -> tuple[Config, PretrainSettings]:
    """The ``phantom-pretrain`` preset's Config with the Config keys of ``values``, and the PretrainSettings of
    the others; a key that is neither raises naming it."""
    _checked(values, source, _PRETRAIN_KEYS, _PRETRAIN_KEYS_ARE)
    settings = {k: v for k, v in values.items() if k in _PRETRAIN_FIELDS}
    cfg = get_config("phantom-pretrain", **{k: v for k, v in values.items() if k not in _PRETRAIN_FIELDS})
    return cfg, PretrainSettings(**settings)
