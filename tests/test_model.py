"""The graft on a tiny random Qwen2-VL and a tiny random Whisper encoder (real architectures, CPU)."""
from __future__ import annotations

import dataclasses

import numpy as np

import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from surgvqa import features
from surgvqa import inference as I
from surgvqa import model as M
from surgvqa import whisper as W
from surgvqa.collate import AUDIO_TOKEN, IGNORE_INDEX
from surgvqa.config import get_config
from surgvqa.data import answer_sentences, candidate_labels, load_template

from test_collate import first_of_types, make_items

FRAME_SIZE = 56


def tiny_whisper(max_source_positions: int = 1500) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    config = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                           num_mel_bins=80, max_source_positions=max_source_positions, decoder_layers=1,
                           decoder_attention_heads=4, decoder_ffn_dim=64)
    torch.manual_seed(0)
    return WhisperEncoder(config).eval(), WhisperFeatureExtractor(feature_size=80)


def tiny_config(**overrides):
    values = dict(vlm_from_scratch=True, frame_size=FRAME_SIZE, question_mode="audio", lora=True, lora_r=8, lora_alpha=16,
                  lora_dropout=0.0, audio_pool=2, audio_projector="linear",
                  pretrained_projector=False)
    return get_config("tiny", **{**values, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny matrices gain nothing from a second thread, and on a shared 2-core machine OpenMP threads
    # spin against other processes: measured 40 ms a linear layer with 2 threads vs 0.8 ms with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whisper():
    return tiny_whisper()


@pytest.fixture(scope="module")
def model(whisper):
    return M.build_model(tiny_config(), whisper=whisper)


@pytest.fixture(scope="module")
def samples():
    # 2, 5 and 3 candidate labels; prompts and answers of different lengths
    return first_of_types("mucosa_visibility", "lesion_motion_direction", "tool_identification")


@pytest.fixture(scope="module")
def items(samples):
    return make_items(samples, size=FRAME_SIZE)


def test_questions_of_several_lengths_go_through_whisper_in_one_call_as_each_would_alone(model, items):
    from surgvqa.whisper import encode_lengths

    batch = M.collator(model)(items)
    lengths = batch["audio_lengths"]
    assert len(set(lengths.tolist())) == len(items)  # every question a different length
    together = encode_lengths(model.whisper, batch["audio_features"], lengths)
    assert together.shape[:2] == (len(items), int(lengths.max()) // 2)
    for i, n in enumerate(lengths.tolist()):
        alone = model.whisper_states(batch["audio_features"][i:i + 1, :, :n])[0]
        torch.testing.assert_close(together[i, : n // 2], alone, atol=1e-5, rtol=1e-5)
    # garbage past a sample's length changes nothing (the padding is zeroed and masked out of attention)
    noisy = batch["audio_features"].clone()
    shortest = int(lengths.argmin())
    noisy[shortest, :, int(lengths[shortest]):] = 5.0
    torch.testing.assert_close(encode_lengths(model.whisper, noisy, lengths), together)
    # the encoder is left as it was
    assert model.whisper.config._attn_implementation != "sdpa_question_padding"


def test_forward_shapes_and_loss(model, items):
    batch = M.collator(model)(items)
    out = model(**batch)
    n_label_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (n_label_tokens, len(model.tokenizer))
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    # a random model is near the uniform loss over its small vocabulary
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(model.tokenizer))))) < 1.0


def test_a_sample_scores_the_same_alone_and_in_a_padded_batch(model, items):
    col = M.collator(model)
    with torch.no_grad():
        together = model(**col(items)).logits
        alone = [model(**col([item])).logits for item in items]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_the_training_loss_of_a_padded_batch_is_its_samples_losses_weighted_by_answer_tokens(model, items):
    """Padding changes nothing a sample contributes: the loss of a batch whose rows differ in length (so that the
    shorter ones are padded) is the token-weighted mean of each sample's loss alone. Batches grouped by length
    (``group_by_length``) pad less and leave the loss as it is."""
    col = M.collator(model)
    batch = col(items)
    assert (batch["attention_mask"] == 0).any(), "the rows must differ in length for padding to be tested"
    with torch.no_grad():
        together = model(**batch).loss
        alone = [(model(**col([item])).loss, int((col([item])["labels"] != IGNORE_INDEX).sum())) for item in items]
    expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)


def test_whisper_runs_on_the_real_length_like_a_whisper_built_for_it(model, whisper, items):
    batch = M.collator(model)(items[:1])
    n_mel = int(batch["audio_lengths"][0])
    encoder, _ = whisper
    short, _ = tiny_whisper(max_source_positions=n_mel // 2)
    state = dict(encoder.state_dict())
    state["embed_positions.weight"] = state["embed_positions.weight"][: n_mel // 2]
    short.load_state_dict(state)
    with torch.no_grad():
        expected = short(batch["audio_features"][:, :, :n_mel]).last_hidden_state
    torch.testing.assert_close(model.whisper_states(batch["audio_features"][:, :, :n_mel]), expected)
    # the shared encoder is left as it was
    assert model.whisper.config.max_source_positions == 1500
    assert model.whisper.embed_positions.num_embeddings == 1500


def test_placeholder_count_mismatch_names_the_sample(model, samples, items):
    batch = M.collator(model)(items)
    audio_id = model.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    first_audio = int((batch["input_ids"][1] == audio_id).nonzero()[0])
    batch["input_ids"][1, first_audio] = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(M.AudioTokenMismatch, match=f"sample {samples[1].uid}: .* placeholder tokens"):
        model(**batch)
    batch = M.collator(model)(items)
    del batch["audio_features"], batch["audio_lengths"]
    with pytest.raises(M.AudioTokenMismatch, match="no audio features"):
        model(**batch)


def test_text_mode_runs_without_audio(whisper, items):
    text_model = M.build_model(tiny_config(question_mode="text"), whisper=whisper)
    batch = M.collator(text_model)([(s, f, None) for s, f, _ in items])
    assert "audio_features" not in batch
    assert torch.isfinite(text_model(**batch).loss)


def test_gradients_reach_projector_and_lora_not_whisper_or_vision(whisper, items):
    model = M.build_model(tiny_config(), whisper=whisper)
    model.train()
    model(**M.collator(model)(items)).loss.backward()
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n}
    assert lora and all("language_model" in n for n in lora)
    # LoRA B starts at zero, so A gets no gradient on the first step; B does, on every layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.whisper.parameters())
    assert all(p.grad is None for n, p in named.items() if ".visual." in n)
    # the tiny model's random output layer is trained beside LoRA (a frozen one caps the logits)
    assert all(p.grad is None for n, p in named.items()
               if "lora_" not in n and not n.startswith("projector") and "lm_head.modules_to_save" not in n)
    assert named["vlm.base_model.model.lm_head.modules_to_save.default.weight"].grad is not None
    assert named["vlm.base_model.model.lm_head.original_module.weight"].grad is None
    groups = M.parameter_groups(model)
    assert [g["lr"] for g in groups] == [model.cfg.projector_lr, model.cfg.lr]
    assert sum(p.numel() for g in groups for p in g["params"]) == M.count_parameters(model, trainable_only=True)


def _label_logits(model, items):
    with torch.no_grad():
        return model(**M.collator(model)(items)).logits


def _perturb_trainables(model):
    # LoRA B is zero at init: perturb every trainable weight so a reload that drops one would show
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("lora", [True, False])
def test_save_and_reload_give_identical_logits(whisper, items, tmp_path, lora):
    model = M.build_model(tiny_config(lora=lora), whisper=whisper)
    _perturb_trainables(model)
    model.eval()
    before = _label_logits(model, items)
    M.save_checkpoint(model, tmp_path)
    assert {"config.json", "projector.safetensors", "tokenizer.json", "preprocessor_config.json"} <= \
        {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "adapter").is_dir() == lora and (tmp_path / "whisper").is_dir()
    reloaded = M.load_checkpoint(tmp_path).eval()
    assert reloaded.cfg == model.cfg
    assert torch.equal(_label_logits(reloaded, items), before)


def test_merge_for_export_keeps_the_logits(whisper, items, tmp_path):
    model = M.build_model(tiny_config(), whisper=whisper)
    _perturb_trainables(model)
    model.eval()
    before = _label_logits(model, items)
    merged = M.merge_for_export(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_label_logits(merged, items), before, atol=1e-4, rtol=1e-4)
    M.save_checkpoint(merged, tmp_path)
    assert not (tmp_path / "adapter").exists()
    torch.testing.assert_close(_label_logits(M.load_checkpoint(tmp_path).eval(), items), before,
                               atol=1e-4, rtol=1e-4)


def test_4bit_load_of_a_saved_tiny_model(whisper, items, tmp_path):
    import bitsandbytes as bnb

    saved = M.build_model(tiny_config(lora=False), whisper=whisper)
    M.save_checkpoint(saved, tmp_path)
    cfg = tiny_config(vlm=str(tmp_path / "vlm"), vlm_from_scratch=False, load_in_4bit=True, lora_dropout=0.05)
    quantized = M.build_model(cfg, whisper=whisper)
    layers = dict(quantized.base_vlm.named_modules())
    assert isinstance(layers["model.language_model.layers.0.mlp.down_proj"].base_layer, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in layers.items()
                   if n.startswith(("model.visual", "lm_head")))
    out = quantized(**M.collator(quantized)(items[:2]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in quantized.named_parameters() if "lora_B" in n)


def test_score_candidates_matches_teacher_forced_likelihoods(model, samples, items):
    col = M.collator(model)
    scores = I.score_candidates(model, col(items, for_generation=True))
    sentences = answer_sentences()
    for s, item, result in zip(samples, items, scores):
        labels = candidate_labels(s.question_type)
        assert result.uid == s.uid and list(result.probabilities) == labels
        assert abs(sum(result.probabilities.values()) - 1) < 1e-6
        assert result.label == max(result.probabilities, key=result.probabilities.get)
        for label in labels:
            answered = dataclasses.replace(s, answer=sentences[(s.question_type, label)])
            batch = col([(answered, item[1], item[2])])
            with torch.no_grad():
                logits = model(**batch).logits
            targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
            expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()
            assert abs(result.log_likelihoods[label] - expected.item()) < 1e-3, (s.uid, label)


def test_generate_is_greedy_decoding_of_the_forward(model, items):
    col = M.collator(model)
    answers = I.generate(model, col(items, for_generation=True), max_new_tokens=4)
    assert len(answers) == len(items)
    for item, answer in zip(items, answers):
        batch = col([item], for_generation=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        greedy = []
        with torch.no_grad():
            for _ in range(4):
                step = {**batch, "input_ids": ids, "attention_mask": mask,
                        "mm_token_type_ids": torch.nn.functional.pad(batch["mm_token_type_ids"],
                                                                     (0, ids.shape[1] - batch["input_ids"].shape[1]))}
                token = model(**step).logits.argmax(-1)
                greedy.append(int(token))
                if int(token) == model.im_end_id:
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        assert answer == model.tokenizer.decode(greedy, skip_special_tokens=True).strip()


def test_vocab_projector_rows_are_mixtures_of_the_models_token_embeddings(whisper):
    model = M.build_model(tiny_config(audio_projector="vocab", audio_pool=4), whisper=whisper)
    embeddings = model.base_vlm.get_input_embeddings().weight
    projector = model.projector
    assert projector.linear.out_features == embeddings.shape[0]
    # its own weights only: the embeddings stay the language model's (one optimizer group each)
    assert {n for n, _ in projector.named_parameters()} == {"linear.weight", "linear.bias"}
    frames = torch.randn(2, 8, whisper[0].config.d_model)
    with torch.no_grad():
        rows = projector(frames)
        assert rows.shape == (2, 2, embeddings.shape[1])  # 8 frames pooled by 4
        # a confident row is that token's embedding
        token = 17
        projector.linear.bias.zero_()
        projector.linear.bias[token] = 1e4
        assert torch.allclose(projector(frames), embeddings[token].expand(2, 2, -1), atol=1e-5)
        embeddings[token] += 1.0  # it reads the embeddings at every call, as they train
        assert torch.allclose(projector(frames), embeddings[token].expand(2, 2, -1), atol=1e-5)
        embeddings[token] -= 1.0


@pytest.mark.parametrize("max_new_tokens", [1, 6, 32])
def test_answer_and_score_equals_generate_and_score_candidates(model, items, max_new_tokens):
    # one prefill for both: the decoded answer must not leak into the candidates' cache
    batch = M.collator(model)(items, for_generation=True)
    answers, scores = I.answer_and_score(model, batch, max_new_tokens=max_new_tokens)
    assert answers == I.generate(model, batch, max_new_tokens=max_new_tokens)
    for got, expected in zip(scores, I.score_candidates(model, batch)):
        assert got.label == expected.label and list(got.log_likelihoods) == list(expected.log_likelihoods)
        for label, value in expected.log_likelihoods.items():
            assert abs(got.log_likelihoods[label] - value) < 1e-4, label


def test_generation_helpers_refuse_a_training_batch(model, items):
    batch = M.collator(model)(items)
    for helper in (I.generate, I.score_candidates, I.answer_and_score):
        with pytest.raises(ValueError, match="generation batch"):
            helper(model, batch)


def test_tiny_preset_loads_the_shipped_phantom_pretrained_weights(whisper):
    from safetensors.torch import load_file
    # the shipped projector was trained on Whisper tiny.en's outputs: another encoder cannot use it
    with pytest.raises(ValueError, match="trained for other audio.*whisper_fingerprint"):
        M.build_model(get_config("tiny"), whisper=whisper)
    pretrained = M.build_model(get_config("tiny", pretrained_projector=False), whisper=whisper)
    shipped = load_file(str(M.TINY_PRETRAINED_DIR / "model.safetensors"))
    name = next(k for k in shipped if k.endswith("embed_tokens.weight"))
    loaded = dict(pretrained.base_vlm.named_parameters())
    weight = next(v for k, v in loaded.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(weight[: len(shipped[name])], shipped[name])
    scratch = M.build_model(get_config("tiny", vlm_from_scratch=True), whisper=whisper)
    assert scratch.base_vlm.config.text_config.num_hidden_layers != 0
    assert not torch.equal(dict(scratch.base_vlm.named_parameters())[next(
        k for k in loaded if k.endswith("embed_tokens.weight"))][: len(shipped[name])], shipped[name])



def test_mixed_batches_take_audio_only_where_the_prompt_hears_it(model, items):
    import dataclasses
    mixed = dataclasses.replace(M.collator(model), question_mode="mixed", mode_seed=1)
    items = [(dataclasses.replace(s, id=f"{s.id}-{k}"), f, w) for k in range(3) for s, f, w in items]  # 9 uids
    batch = mixed(items)
    assert 0 < len(batch["audio_rows"]) < len(items)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # candidate scoring runs on a mixed generation batch too; audio rows that point at the wrong items fail
    scores = I.score_candidates(model, mixed(items * 3, for_generation=True))
    assert len(scores) == len(items) * 3
    shifted = dict(batch, audio_rows=batch["audio_rows"].flip(0))
    with pytest.raises(M.AudioTokenMismatch):
        model(**shifted)


# --- cached encoder outputs ---

def cached_items(model, items, tmp_path, cfg):
    """The items with their waveforms written as WAVs, encoded into a cache, and read back from it."""
    from surgvqa import files
    from surgvqa.collate import EncodedQuestion

    col = M.collator(model)
    paths = {}
    for s, _, wave in items:
        paths[s.uid] = str(tmp_path / f"{s.id}.wav")
        files.write_wav_atomic(tmp_path / f"{s.id}.wav", wave, 16000)
    by_uid = {s.uid: s for s, _, _ in items}
    calls = []

    def encode(mel):
        calls.append(len(mel))
        return model.whisper_states(mel)

    folder = features.encoded_audio_dir(W.encoder_fingerprint(model.whisper), cfg.audio_pool, cfg)
    cached = features.cache_encoded_audio(paths, lambda uid, wave: col.log_mel(by_uid[uid], wave), encode, folder,
                                       cfg, progress=False)
    width = model.whisper.config.d_model
    return ([(s, f, EncodedQuestion(features.load_encoded_audio(s.uid, cached[s.uid], width))) for s, f, _ in items],
            cached, calls)


def test_cached_encoder_outputs_give_the_same_loss_as_running_whisper(model, items, tmp_path):
    from surgvqa import audio

    cfg = tiny_config(audio_features_dir=str(tmp_path / "features"), audio_dir=str(tmp_path))
    # the WAV round trip quantises to 16 bit: compare against the same quantised waveforms
    quantised = [(s, f, audio.load_question_audio(s.uid, tmp_path / f"{s.id}.wav", cfg))
                 for s, f, _ in cached_items(model, items, tmp_path, cfg)[0]]
    encoded, cached, calls = cached_items(model, items, tmp_path, cfg)
    assert calls == [] and len(set(cached.values())) == 3  # the second pass found every file cached
    col = M.collator(model)
    direct, from_cache = col(quantised), col(encoded)
    assert "audio_features" not in from_cache and from_cache["audio_encoded"].shape[-1] == 64
    assert torch.equal(direct["input_ids"], from_cache["input_ids"])
    torch.testing.assert_close(direct["audio_lengths"], from_cache["audio_lengths"])
    with torch.no_grad():
        torch.testing.assert_close(model(**direct).logits, model(**from_cache).logits, atol=1e-5, rtol=1e-5)


def test_a_corrupt_cached_encoder_output_names_the_sample_and_file(model, items, tmp_path):
    from surgvqa import audio

    cfg = tiny_config(audio_features_dir=str(tmp_path / "features"), audio_dir=str(tmp_path))
    _, cached, _ = cached_items(model, items, tmp_path, cfg)
    uid = items[0][0].uid
    cached[uid].write_bytes(b"not an array")
    with pytest.raises(audio.AudioError, match=f"sample {uid} .*{cached[uid].name}.*cannot be read"):
        features.load_encoded_audio(uid, cached[uid], 64)
    with pytest.raises(audio.AudioError, match=r"expected finite float32 \(frames, 32\)"):
        features.load_encoded_audio(uid, cached[items[1][0].uid], 32)


def test_a_cached_encoder_output_replaced_or_cut_short_is_refused(model, items, tmp_path):
    from surgvqa import audio

    cfg = tiny_config(audio_features_dir=str(tmp_path / "features"), audio_dir=str(tmp_path))
    _, cached, _ = cached_items(model, items, tmp_path, cfg)
    uid = items[0][0].uid
    array = features.load_encoded_audio(uid, cached[uid], 64)
    np.save(cached[uid], np.zeros_like(array))  # well-formed, wrong
    with pytest.raises(audio.AudioError, match=f"sample {uid} .*not what was written.*sha256"):
        features.load_encoded_audio(uid, cached[uid], 64)
    np.save(cached[uid], array[: len(array) // 2])
    with pytest.raises(audio.AudioError, match="not what was written.*'frames': \\(" + str(len(array))):
        features.load_encoded_audio(uid, cached[uid], 64)
    cached[uid].with_suffix(".json").unlink()  # facts missing: encoded again on the next pass
    again, calls = cached_items(model, items, tmp_path, cfg)[1:]
    assert calls == [1] and features.load_encoded_audio(uid, again[uid], 64).shape == array.shape


def test_a_missing_question_wav_is_named_before_anything_is_encoded(model, items, tmp_path):
    from surgvqa import audio

    cfg = tiny_config(audio_dir=str(tmp_path))
    with pytest.raises(audio.AudioError, match=f"sample {items[0][0].uid} .*nowhere.wav.*does not exist"):
        features.cache_encoded_audio({items[0][0].uid: str(tmp_path / "nowhere.wav")}, None, None, tmp_path, cfg)


def test_the_encoder_fingerprint_follows_the_weights(whisper):
    encoder, _ = whisper
    same, _ = tiny_whisper()
    assert W.encoder_fingerprint(encoder) == W.encoder_fingerprint(same)
    with torch.no_grad():
        same.layers[0].fc1.weight[0, 0] += 1e-3
    assert W.encoder_fingerprint(encoder) != W.encoder_fingerprint(same)


def test_a_batch_cannot_mix_waveforms_and_cached_outputs(model, items):
    from surgvqa.collate import CollateError, EncodedQuestion

    s, f, _ = items[1]
    mixed = [items[0], (s, f, EncodedQuestion(np.zeros((4, 64), np.float32)))]
    with pytest.raises(CollateError, match="mixes waveforms and cached encoder outputs"):
        M.collator(model)(mixed)


def test_candidates_of_one_token_each_are_scored_from_the_prompt_alone(model):
    # the tiny tokenizer holds blue_dye_presence's answer prefixes as single tokens: nothing to feed after the prompt
    from test_collate import make_items

    rows = [s for s in load_template("out") if s.question_type == "blue_dye_presence"][:2]
    scores = I.score_candidates(model, M.collator(model)(make_items(rows, size=FRAME_SIZE, seconds=(1.0, 1.5)),
                                                         for_generation=True))
    assert [sorted(s.probabilities) for s in scores] == [["no", "yes"]] * 2
    assert all(abs(sum(s.probabilities.values()) - 1) < 1e-9 for s in scores)


def test_a_repository_relative_checkpoint_loads_from_any_working_directory(whisper, tmp_path, monkeypatch):
    # a notebook's kernel runs in notebooks/, while -p checkpoint=data/processed/... names a repository path
    from surgvqa.config import REPO_ROOT

    target = REPO_ROOT / "data" / "interim" / "test-relative-checkpoint"
    M.save_checkpoint(M.build_model(tiny_config(lora=False), whisper=whisper), target)
    monkeypatch.chdir(tmp_path)
    try:
        assert M.load_checkpoint("data/interim/test-relative-checkpoint").cfg.lora is False
    finally:
        import shutil

        shutil.rmtree(target)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        M.load_checkpoint("data/interim/no-such-checkpoint")


@pytest.mark.parametrize("mode", ["audio", "text", "both"])
def test_the_fast_path_answers_and_scores_as_the_plain_path(model, items, mode):
    """What CUDA runs (surgvqa.fastpath: static KV cache, clip attention; graphs off on a CPU) computes what
    the plain path computes: the same greedy answers and candidate labels, log-likelihoods within float
    rounding."""
    from surgvqa import fastpath

    batch = dataclasses.replace(M.collator(model), question_mode=mode)(items, for_generation=True)
    plain_answers, plain_scores = I.answer_and_score(model, batch, max_new_tokens=12)
    with I._evaluating(model):
        fast_answers, fast_scores = fastpath.answer_and_score(model, batch, 12, use_graph=False)
        only_scores = fastpath.answer_and_score(model, batch, 0, use_graph=False)
    assert fast_answers == plain_answers
    assert only_scores[0] is None and [s.label for s in only_scores[1]] == [s.label for s in fast_scores]
    for plain, fast in zip(plain_scores, fast_scores):
        assert fast.uid == plain.uid and fast.label == plain.label
        assert list(fast.log_likelihoods) == list(plain.log_likelihoods)
        for label, value in plain.log_likelihoods.items():
            assert fast.log_likelihoods[label] == pytest.approx(value, rel=1e-4, abs=1e-4), (mode, label)


def test_the_fast_path_ends_each_answer_at_its_end_of_turn_as_the_plain_path():
    """The shipped model answers in sentences that end: rows finish at different steps, and decoding stops
    once all have (the plain path feeds finished rows padding; the fast path cuts after the end-of-turn)."""
    from surgvqa import fastpath

    shipped = M.load_checkpoint(M.REPO_ROOT / "checkpoints" / "tiny-phantom")
    samples = first_of_types("mucosa_visibility", "lesion_motion_direction", "tool_identification", "lesion_site")
    items = make_items(samples, size=shipped.cfg.frame_size, seconds=(1.0, 1.7, 2.3, 1.2))
    batch = dataclasses.replace(M.collator(shipped), question_mode="text")(items, for_generation=True)
    plain, _ = I.answer_and_score(shipped, batch, max_new_tokens=40)
    with I._evaluating(shipped):
        fast, _ = fastpath.answer_and_score(shipped, batch, 40, use_graph=False)
    assert fast == plain
    lengths = {len(shipped.tokenizer(a)["input_ids"]) for a in plain}
    assert len(lengths) > 1 and max(lengths) < 39, plain  # ended, at different lengths


def test_the_fast_path_on_a_4bit_model_scores_as_the_plain_path(whisper, items, tmp_path):
    """4-bit preparation keeps the embeddings and lm_head in fp32 around nf4 layers: the static cache takes
    the prompt cache's dtype and the answers and labels stay those of the plain path."""
    from surgvqa import fastpath

    M.save_checkpoint(M.build_model(tiny_config(lora=False), whisper=whisper), tmp_path)
    quantized = M.build_model(tiny_config(vlm=str(tmp_path / "vlm"), vlm_from_scratch=False, load_in_4bit=True),
                              whisper=whisper)
    batch = M.collator(quantized)(items, for_generation=True)
    I.answer_and_score(quantized, batch, max_new_tokens=6)  # bitsandbytes' CPU backend repacks at first use
    plain_answers, plain_scores = I.answer_and_score(quantized, batch, max_new_tokens=6)
    with I._evaluating(quantized):
        fast_answers, fast_scores = fastpath.answer_and_score(quantized, batch, 6, use_graph=False)
    assert fast_answers == plain_answers
    for plain, fast in zip(plain_scores, fast_scores):
        assert fast.label == plain.label
        for label, value in plain.log_likelihoods.items():
            assert fast.log_likelihoods[label] == pytest.approx(value, rel=1e-3, abs=1e-3)


def test_a_4bit_model_keeps_its_frozen_parts_in_their_dtype(whisper, tmp_path):
    """QLoRA leaves the frozen vision tower, embeddings and lm_head in the checkpoint's dtype (bf16 here, as
    the real presets load them) instead of casting them to fp32; only the adapters and projector train."""
    M.save_checkpoint(M.build_model(tiny_config(lora=False, dtype="bfloat16"), whisper=whisper), tmp_path)
    quantized = M.build_model(tiny_config(vlm=str(tmp_path / "vlm"), vlm_from_scratch=False, load_in_4bit=True,
                                          dtype="bfloat16"), whisper=whisper)
    base = quantized.base_vlm
    for part in (base.model.visual, base.get_input_embeddings(), base.lm_head):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    trainable = {n for n, p in quantized.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)


def test_the_baselines_refuse_an_unknown_one_before_running_anything():
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['asr-typo'\]"):
        I.run_baselines(None, [], None, get_config("smoke"), modes=["audio", "asr-typo"])
