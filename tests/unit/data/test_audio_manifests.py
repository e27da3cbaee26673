"""Audio manifests through the tiny real codec: bad input by file and line, skips, the code cache, references.

Audio manifests end to end with the tiny real codec (boson's HiggsAudioTokenizer at toy size): every bad
input named by file and line, the skip policy and its report, the code cache (incremental, resumable,
content-addressed), voice-clone reference placement against the inference engine, ChatML lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import QUIET, ROOT, TINY, tiny_config

from higgs_ddp.config import load_config
from higgs_ddp.data import code_cache, prepare
from higgs_ddp.data.codec import build_tiny_tokenizer_model, codec_identity, load_codec
from higgs_ddp.data.collator import HiggsCollator
from higgs_ddp.data.dataset import DataError, ManifestDataset, load_data
from higgs_ddp.model import model_config
from higgs_ddp.runtime.distributed import DistEnv
from higgs_ddp.tools.demo_data import text_to_wave

SR = 8000  # the tiny codec's rate


def wav(base: Path, rel: str, seconds=0.4, sr=SR, text="hello", **kw) -> str:
    p = base / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    w = text_to_wave(text * 20)[: int(seconds * SR)]
    if sr != SR:
        w = np.interp(np.arange(int(seconds * sr)) * SR / sr, np.arange(len(w)), w).astype(np.float32)
    sf.write(p, w, sr, **kw)
    return rel


def write_manifest(base: Path, lines, name="manifest.jsonl") -> Path:
    p = base / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


def config(tmp_path, manifests, *overrides):
    paths = [str(m) for m in (manifests if isinstance(manifests, list) else [manifests])]
    return load_config(str(TINY), [*QUIET, f"output_dir={tmp_path / 'run'}", f"data.manifest={json.dumps(paths)}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0", *overrides])


def load(tmp_path, tokenizer, manifests, *overrides):
    cfg = config(tmp_path, manifests, *overrides)
    return load_data(cfg, DistEnv(), tokenizer, model_config(cfg, tokenizer), quiet=True)


@pytest.fixture(scope="module")
def codec():
    return load_codec("tiny")


# ------------------------------------------------------------------------------------------ bad input


def _bad_files(base: Path) -> dict:
    """Audio files broken in every way a corpus goes wrong."""
    (base / "clips").mkdir(parents=True, exist_ok=True)
    (base / "clips" / "text.wav").write_text("this is a transcript saved with the wrong name\n")
    wav(base, "clips/good.flac")
    data = bytearray((base / "clips" / "good.flac").read_bytes())
    data[200:2000] = bytes(1800)
    (base / "clips" / "corrupt.flac").write_bytes(bytes(data))
    wav(base, "clips/whole.wav", subtype="PCM_16")
    (base / "clips" / "truncated.wav").write_bytes((base / "clips" / "whole.wav").read_bytes()[:3000])
    sf.write(base / "clips" / "empty.wav", np.zeros(0, np.float32), SR)
    wav(base, "clips/long.wav", seconds=3.0)
    sf.write(base / "clips" / "rate.wav", np.zeros(50, np.float32), 100)
    nan = text_to_wave("nan" * 10)
    nan[7] = np.nan
    sf.write(base / "clips" / "nan.wav", nan, SR, subtype="FLOAT")
    wav(base / "..", "outside.wav")
    wav(base, "clips/ref.wav")
    sf.write(base / "clips" / "short.wav", text_to_wave("hi")[:80], SR)  # 10 ms: under one codec frame
    return {}


AUDIO_CASES = [  # (id, line, fragment of the message, reason in the report)
    ("missing", {"text": "a", "audio": "clips/absent.wav"}, "audio clips/absent.wav not found", "audio_missing"),
    ("directory", {"text": "a", "audio": "clips"}, "audio clips is a directory, not a file", "audio_is_directory"),
    ("not_audio", {"text": "a", "audio": "clips/text.wav"}, "audio clips/text.wav is not a readable audio file",
     "audio_unreadable"),
    ("corrupt", {"text": "a", "audio": "clips/corrupt.flac"}, "audio clips/corrupt.flac is corrupt", "audio_corrupt"),
    ("truncated", {"text": "a", "audio": "clips/truncated.wav"}, "audio clips/truncated.wav is truncated",
     "audio_corrupt"),
    ("zero_length", {"text": "a", "audio": "clips/empty.wav"}, "audio clips/empty.wav has no samples", "audio_empty"),
    ("too_long", {"text": "a", "audio": "clips/long.wav"}, "lasts 3.0 s, more than data.max_audio_seconds=2",
     "audio_too_long"),
    ("too_short", {"text": "a", "audio": "clips/short.wav"}, "audio clips/short.wav is too short for the codec: "
     "10.0 ms, its encoder needs 39.0 ms", "audio_too_short"),
    ("sample_rate", {"text": "a", "audio": "clips/rate.wav"}, "claims a sample rate of 100 Hz", "audio_bad_sample_rate"),
    ("non_finite", {"text": "a", "audio": "clips/nan.wav"}, "holds 1 non-finite (NaN/inf) samples", "audio_non_finite"),
    ("bad_reference", {"text": "a", "audio": "clips/good.flac", "ref_audio": "clips/empty.wav", "ref_text": "r"},
     "audio clips/empty.wav has no samples", "audio_empty"),
    ("ref_without_text", {"text": "a", "audio": "clips/good.flac", "ref_audio": "clips/ref.wav"},
     "a reference needs both its audio", "ref_without_text"),
    ("outside_root", {"text": "a", "audio": "../outside.wav"}, "audio ../outside.wav is outside the dataset root",
     "path_outside_root"),
    ("empty_text", {"text": "", "audio": "clips/good.flac"}, "field 'text' is empty", "empty_text"),
    ("text_type", {"text": ["a"], "audio": "clips/good.flac"}, "field 'text' must be a str, got list", "wrong_type"),
    ("no_audio", {"text": "a"}, "missing field 'audio'", "missing_field"),
    ("invalid_json", '{"text": "a", "audio": ', "invalid JSON", "invalid_json"),
]
STRICT = ["data.max_audio_seconds=2", "data.allow_outside_root=false"]


@pytest.mark.parametrize("line, fragment, reason", [c[1:] for c in AUDIO_CASES], ids=[c[0] for c in AUDIO_CASES])
def test_each_bad_audio_line_is_one_clear_line(tmp_path, tokenizer, line, fragment, reason):
    base = tmp_path / "ds"
    _bad_files(base)
    m = write_manifest(base, [{"text": "fine", "audio": "clips/good.flac"}, line])
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, m, *STRICT)
    msg = str(ei.value)
    assert msg.startswith("1 problem(s) in the data")
    body = msg.splitlines()[1:]
    assert body == [body[0]] and body[0].startswith(f"{m}:2: ") and fragment in body[0], body
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped_by_reason"] == {reason: 1}


def test_skip_policy_counts_reports_and_trains_on_the_rest(tmp_path, tokenizer):
    base = tmp_path / "ds"
    _bad_files(base)
    good = [{"text": f"fine {i}", "audio": "clips/good.flac"} for i in range(3)]
    m = write_manifest(base, good + [c[1] for c in AUDIO_CASES])
    with pytest.raises(DataError) as ei:  # the default stops, with every problem listed
        load(tmp_path, tokenizer, m, *STRICT)
    rows = str(ei.value).splitlines()[1:]
    assert [r.split(": ")[0] for r in rows] == [f"{m}:{n}" for n in range(4, 4 + len(AUDIO_CASES))]

    data = load(tmp_path, tokenizer, m, *STRICT, "data.on_error=skip")
    assert len(data.train) == 3
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_samples"] == 3 and report["skipped"] == len(AUDIO_CASES)
    want = {}
    for c in AUDIO_CASES:
        want[c[3]] = want.get(c[3], 0) + 1
    assert report["skipped_by_reason"] == want
    assert [p["where"] for p in report["problems"]] == [f"{m}:{n}" for n in range(4, 4 + len(AUDIO_CASES))]


def test_encoded_codes_outside_the_model_codebook_are_a_config_error(tmp_path, tokenizer):
    from higgs_ddp.config import ConfigError

    base = tmp_path / "ds"
    m = write_manifest(base.mkdir() or base, [{"text": "a", "audio": wav(base, "a.wav")}])
    cfg = config(tmp_path, m)
    mc = model_config(cfg, tokenizer)
    mc.audio_num_codebooks = 8  # a model that expects the real codec's 8 codebooks
    with pytest.raises(ConfigError, match="data.codec=tiny produces 4 codebooks, the model uses 8"):
        load_data(cfg, DistEnv(), tokenizer, mc, quiet=True)


def test_the_shortest_clip_is_computed_from_the_codec_layers_and_exact(codec, tmp_path):
    from higgs_ddp.data.codec import min_input_seconds, save_tiny_codec_folder

    n = codec.min_samples  # from the loaded encoder's convolutions
    assert n == 312  # hop 320: (8, 5, 4, 2) strided convolutions with kernels 16, 10, 8, 4
    assert codec.encode(torch.zeros(n)).shape == (4, 1)
    with pytest.raises(RuntimeError, match="Kernel size"):  # what prepare used to die of
        codec.encode(torch.zeros(n - 1))
    # Without loading weights (the start-up check of eval.prompts): the same number from the codec's config.
    assert min_input_seconds("tiny") == n / SR
    assert min_input_seconds(str(save_tiny_codec_folder(tmp_path / "codec"))) == n / SR


def test_a_too_short_clip_at_another_rate_is_judged_after_resampling(tmp_path, tokenizer):
    base = tmp_path / "ds"
    base.mkdir()
    # 624 samples at 16 kHz become the 312 the tiny codec needs at 8 kHz; 622 become 311.
    sf.write(base / "ok.wav", text_to_wave("hi" * 9)[:624], 16000)
    sf.write(base / "short.wav", text_to_wave("hi" * 9)[:622], 16000)
    m = write_manifest(base, [{"text": "a", "audio": "ok.wav"}, {"text": "b", "audio": "short.wav"}])
    data = load(tmp_path, tokenizer, m, "data.on_error=skip")
    assert [r.where for r in data.train] == [f"{m}:1"]
    assert data.report["skipped_by_reason"] == {"audio_too_short": 1}


def test_the_encode_bar_says_it_counts_rank_0s_share(tmp_path, capsys):
    # Two ranks, three new files: rank 0 encodes two of them and its bar must not read as the total.
    paths = [tmp_path / wav(tmp_path, f"{i}.wav") for i in range(2)]
    cache = code_cache.CodeCache(tmp_path / "cache", codec_identity("tiny"))
    prepare._encode([(f"key{i}", p) for i, p in enumerate(paths)], {p: p.name for p in paths}, cache, "tiny", None,
                    0, DistEnv(rank=0, world_size=2), 0, False, total=3)
    assert "encode (rank 0's 2 of 3 new files, 2 ranks)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the cache


def _corpus(base: Path, n=6) -> Path:
    lines = [{"text": f"line {i}", "audio": wav(base, f"clips/{i}.wav", text=f"sample {i}")} for i in range(n)]
    return write_manifest(base, lines)


def test_codes_are_the_codecs_and_the_cache_is_incremental(tmp_path, tokenizer, codec):
    base = tmp_path / "ds"
    m = _corpus(base)
    first = load(tmp_path, tokenizer, m)
    for i, r in enumerate(first.train):
        wave, _ = sf.read(base / f"clips/{i}.wav", dtype="float32")
        assert np.array_equal(r.codes[0], codec.encode(torch.from_numpy(wave)).numpy())

    refs = _refs(tmp_path, m)
    again = prepare.prepare_audio(refs, str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert (again.stats["cached"], again.stats["encoded"]) == (6, 0)

    wav(base, "clips/2.wav", text="changed content")  # edited: encoded again
    wav(base, "clips/6.wav", text="a new file")  # new
    (base / "clips/1.wav").rename(base / "clips/renamed.wav")  # renamed: same content, still cached
    lines = [json.loads(x) for x in m.read_text().splitlines()]
    lines[1]["audio"] = "clips/renamed.wav"
    m = write_manifest(base, lines + [{"text": "new", "audio": "clips/6.wav"}])
    third = prepare.prepare_audio(_refs(tmp_path, m), str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0,
                                  quiet=True)
    assert (third.stats["cached"], third.stats["encoded"]) == (5, 2)
    # Another codec never sees these codes.
    other = code_cache.CodeCache(tmp_path / "cache", codec_identity("tiny") + ":other")
    assert not other.entries


def test_cached_codes_are_mapped_from_their_shards_not_copied(tmp_path):
    """The codes come back as views into their mapped shard (the ranks of a node share one copy in the page
    cache), equal to what was written, with no file left open; a shard whose header does not match its
    bytes is a damaged shard, never a read past its end."""
    import os

    from safetensors import SafetensorError

    rng = np.random.default_rng(0)
    written = {f"k{i}": torch.from_numpy(rng.integers(0, 1024, (8, 5 + i)).astype(np.int16)) for i in range(5)}
    writer = code_cache.CodeCache(tmp_path / "cache", "codec-a").writer()
    for key, codes in written.items():
        writer.add(key, codes, 1.0)
    writer.flush()
    open_files = len(os.listdir("/proc/self/fd"))
    loaded = code_cache.CodeCache(tmp_path / "cache", "codec-a").load(written)
    assert len(os.listdir("/proc/self/fd")) == open_files
    for key, codes in written.items():
        assert loaded[key].dtype == np.int16 and not loaded[key].flags.owndata
        assert np.array_equal(loaded[key], codes.numpy())
    for header, data in (({"x": {"dtype": "I16", "shape": [8, 100], "data_offsets": [0, 1600]}}, 16),
                         ({"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 16)):
        text = json.dumps(header).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(len(text).to_bytes(8, "little") + text + bytes(data))
        with pytest.raises(SafetensorError, match="tensor x is not where its header says"):
            code_cache.map_shard(bad)


def _refs(tmp_path, m):
    from higgs_ddp.data.manifest import read_manifest

    entries, problems = read_manifest(str(m))
    assert not problems
    return [r for e in entries for r in e.audio]


def test_interrupted_prepare_resumes_where_it_stopped(tmp_path, monkeypatch):
    base = tmp_path / "ds"
    m = _corpus(base, n=7)
    refs = _refs(tmp_path, m)
    monkeypatch.setattr(code_cache, "SHARD_ENTRIES", 2)
    real, calls = prepare.read_audio, []

    def dies_on_the_sixth(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # Ctrl-C, preemption, a crash
        return real(*args)

    monkeypatch.setattr(prepare, "read_audio", dies_on_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_audio(refs, str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    monkeypatch.setattr(prepare, "read_audio", real)
    cache_dir = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert not (cache_dir / "index.json").exists()  # interrupted before the index was written
    (cache_dir / ".part-torn.safetensors.tmp").write_bytes(b"half a shard")  # a write cut short: ignored
    resumed = prepare.prepare_audio(refs, str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert (resumed.stats["cached"], resumed.stats["encoded"]) == (5, 2)
    fresh = prepare.prepare_audio(refs, str(tmp_path / "fresh"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    for path, codes in fresh.codes.items():
        assert np.array_equal(resumed.codes[path], codes)
    assert json.loads((cache_dir / "index.json").read_text())["codec"] == codec_identity("tiny")


def test_stereo_and_other_rates_are_downmixed_and_resampled(tmp_path, tokenizer, codec):
    import torchaudio.functional as AF

    base = tmp_path / "ds"
    mono = text_to_wave("stereo test " * 4)
    sf.write(base.mkdir() or base / "stereo.wav", np.stack([1.5 * mono, 0.5 * mono], 1), SR, subtype="FLOAT")
    sf.write(base / "mono.wav", mono, SR, subtype="FLOAT")
    hi = AF.resample(torch.from_numpy(mono), SR, 16000)
    sf.write(base / "hi.wav", hi.numpy(), 16000, subtype="FLOAT")
    m = write_manifest(base, [{"text": "s", "audio": "stereo.wav"}, {"text": "m", "audio": "mono.wav"},
                              {"text": "h", "audio": "hi.wav"}])
    s, mo, h = load(tmp_path, tokenizer, m).train
    assert np.array_equal(s.codes[0], mo.codes[0])
    want = codec.encode(AF.resample(hi, 16000, SR)).numpy()
    assert np.array_equal(h.codes[0], want)


# ------------------------------------------------------------------------- reference, ChatML, splits


def test_reference_audio_is_placed_as_the_inference_engine_places_it(tmp_path, tokenizer):
    """boson's HiggsAudioServeEngine._prepare_inputs, with the same (tiny, real) codec, against our data path."""
    from types import SimpleNamespace

    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    from higgs_ddp.data.prompt import build_chatml

    base = tmp_path / "ds"
    base.mkdir()
    wav(base, "ref.wav", seconds=0.6, text="the reference voice")
    m = write_manifest(base, [{"text": "Say this.", "audio": wav(base, "target.wav"), "ref_audio": "ref.wav",
                               "ref_text": "reference words", "scene": "a quiet room"}])
    cfg = config(tmp_path, m)
    mc = model_config(cfg, tokenizer)
    record = load_data(cfg, DistEnv(), tokenizer, mc, quiet=True).train[0]

    ids = tokenizer.convert_tokens_to_ids
    C, CB = mc.audio_num_codebooks, mc.audio_codebook_size
    engine = SimpleNamespace(
        tokenizer=tokenizer, audio_tokenizer=build_tiny_tokenizer_model(), device="cpu",
        model=SimpleNamespace(device="cpu"),
        collator=HiggsAudioSampleCollator(
            whisper_processor=None, encode_whisper_embed=False, audio_in_token_id=ids("<|AUDIO|>"),
            audio_out_token_id=ids("<|AUDIO_OUT|>"), audio_stream_bos_id=CB, audio_stream_eos_id=CB + 1,
            pad_token_id=ids("<|end_of_text|>"), return_audio_in_tokens=False, use_delay_pattern=True,
            audio_num_codebooks=C, round_to=1))
    chatml = build_chatml("Say this.", "a quiet room", "reference words", with_reference=True, with_target=False)
    chatml.messages[2].content.audio_url = str(base / "ref.wav")
    want = HiggsAudioServeEngine._prepare_inputs(engine, chatml)

    batch = HiggsCollator.for_model(mc)([ManifestDataset([record])[0]])
    n, ref_cols = want["input_ids"].shape[1], want["audio_out_ids"].shape[1]
    assert torch.equal(batch.input_ids[0, :n], want["input_ids"][0])
    assert torch.equal(batch.audio_out_ids[:, :ref_cols], want["audio_out_ids"])  # same codes, same place
    assert (batch.label_audio_ids[:, :ref_cols] == -100).all(), "the reference must never be a target"
    assert (batch.label_audio_ids[:, ref_cols:] != -100).any()


def test_chatml_lines_multi_turn_with_context_audio(tmp_path, tokenizer):
    base = tmp_path / "ds"
    base.mkdir()
    line = {"messages": [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": [{"type": "text", "text": "Listen:"}, {"type": "audio", "audio_url": wav(base, "in.wav")}]},
        {"role": "assistant", "content": {"type": "audio", "audio_url": wav(base, "a1.wav", text="first")}},
        {"role": "user", "content": "SPEAKER1: and now you"},
        {"role": "assistant", "content": {"type": "audio", "audio_url": wav(base, "a2.wav", text="second")}},
    ], "start_index": 4, "speaker": "SPEAKER1", "id": "dialog-1"}
    m = write_manifest(base, [line])
    cfg = config(tmp_path, m)
    mc = model_config(cfg, tokenizer)
    (record,) = load_data(cfg, DistEnv(), tokenizer, mc, quiet=True).train
    assert record.id == "dialog-1" and len(record.codes) == 3
    batch = HiggsCollator.for_model(mc)([ManifestDataset([record])[0]])
    assert batch.audio_in_ids.shape[1] == record.codes[0].shape[1] + 2 + mc.audio_num_codebooks - 1
    first = record.codes[1].shape[1] + 2 + mc.audio_num_codebooks - 1
    assert (batch.label_audio_ids[:, :first] == -100).all()  # before start_index: context
    assert (batch.label_audio_ids[:, first:] != -100).any()  # the last turn is learned
    assert batch.padded_positions == batch.num_positions == record.positions

    bad = [
        ({"messages": [{"role": "narrator", "content": "x"}]}, "role 'narrator' is not one of"),
        ({"messages": [{"role": "assistant", "content": {"type": "audio", "raw_audio": "AAAA"}}]}, "base64 raw_audio"),
        ({"messages": [{"role": "assistant", "content": {"type": "video"}}]}, "\"type\": \"text\" or \"audio\""),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn to learn from"),
        ({"messages": line["messages"], "start_index": 9}, "start_index 9 is outside the 5 messages"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": line["messages"], "extra": 1}, "unknown field(s) ['extra']"),
    ]
    m = write_manifest(base, [line] + [b for b, _ in bad], name="bad.jsonl")
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, m)
    rows = str(ei.value).splitlines()[1:]
    assert len(rows) == len(bad)
    for i, ((_, fragment), row) in enumerate(zip(bad, rows)):
        assert row.startswith(f"{m}:{i + 2}: ") and fragment in row, row


def test_several_manifests_and_validation_sets(tmp_path, tokenizer):
    base = tmp_path / "ds"
    base.mkdir()
    a = write_manifest(base, [{"text": f"a{i}", "audio": wav(base, f"a{i}.wav", text=f"a{i}")} for i in range(4)], "a.jsonl")
    b = write_manifest(base, [{"text": f"b{i}", "audio": wav(base, f"b{i}.wav", text=f"b{i}"), "id": f"b{i}"}
                              for i in range(40)], "b.jsonl")
    v = write_manifest(base, [{"text": "v", "audio": wav(base, "v.wav", text="v")}], "v.jsonl")  # not a training clip
    both = load(tmp_path, tokenizer, [a, b], f"data.val_manifest={v}")
    assert (len(both.train), len(both.val)) == (44, 1)
    split = load(tmp_path, tokenizer, [a, b], "data.val_fraction=0.25")
    assert len(split.train) + len(split.val) == 44 and 0 < len(split.val) < 22
    ids = {r.id for r in split.val}
    # by id hash: adding data never moves a sample between the splits
    more = write_manifest(base, [{"text": "c", "audio": wav(base, "c.wav", text="c"), "id": "c"}], "c.jsonl")
    assert ids <= {r.id for r in load(tmp_path, tokenizer, [a, b, more], "data.val_fraction=0.25").val}


def test_the_real_codec_loader_offline(tmp_path, monkeypatch, codec):
    """boson's load_higgs_audio_tokenizer reads our codec folder (HuBERT teacher supplied offline) and
    encodes exactly as the in-memory codec; without the teacher or the hub, a one-line CodecError."""
    import huggingface_hub.constants
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    from higgs_ddp.data.codec import Codec, CodecError, _tiny_semantic_teacher, save_tiny_codec_folder

    folder = save_tiny_codec_folder(tmp_path / "codec")
    with _tiny_semantic_teacher():
        loaded = Codec(load_higgs_audio_tokenizer(str(folder), device="cpu"), "x")
    wave = torch.from_numpy(text_to_wave("loader check"))
    assert torch.equal(loaded.encode(wave), codec.encode(wave))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("bosonai/higgs-audio-v2-tokenizer", str(folder)):
        with pytest.raises(CodecError) as ei:
            load_codec(name)
        assert "\n" not in str(ei.value) and "codec" in str(ei.value)


def test_a_codec_in_the_rewritten_hub_format_is_one_line_naming_the_pinned_revision(tmp_path, capsys):
    """The hub repo's April 2026 rewrite nests its config (acoustic_model_config, ...), which boson's
    HiggsAudioTokenizer(**config) refuses with a TypeError deep inside the codec: every way of reaching the
    codec (the loader, its rates, its shortest clip, prepare, the doctor) says instead, in one line, which
    revision loads."""
    from higgs_ddp.cli import prepare
    from higgs_ddp.config import OFFICIAL_CODEC_REVISION
    from higgs_ddp.data.codec import CodecError, codec_rates, min_input_seconds, save_tiny_codec_folder

    folder = save_tiny_codec_folder(tmp_path / "codec")  # model.pth as the old format has it
    (folder / "config.json").write_text(json.dumps({  # the shape of the rewritten repo's config.json
        "model_type": "higgs_audio_v2_tokenizer", "sample_rate": 24000, "codebook_size": 1024,
        "acoustic_model_config": {"model_type": "dac", "hop_length": 960},
        "semantic_model_config": {"model_type": "hubert"}}))
    for call in (load_codec, codec_rates, min_input_seconds):
        with pytest.raises(CodecError) as ei:
            call(str(folder))
        msg = str(ei.value)
        assert "\n" not in msg and str(folder) in msg and OFFICIAL_CODEC_REVISION in msg
        assert "nested format (acoustic_model_config, semantic_model_config)" in msg

    cfg = tiny_config(tmp_path, samples=4, audio=True)
    args = ["--config", str(TINY), f"data.manifest={cfg.data.manifest[0]}", f"output_dir={tmp_path / 'o'}",
            f"data.cache_dir={tmp_path / 'c'}", f"data.codec={folder}"]
    assert prepare(args) == 2
    err = capsys.readouterr().err
    assert f"higgs-ddp: error: codec {folder}: config.json is in the newer nested format" in err
    assert OFFICIAL_CODEC_REVISION in err and "Traceback" not in err
    from higgs_ddp.tools import doctor

    assert doctor.main(args) == 1
    assert any(line.startswith(f"FAIL codec {folder}: config.json is in the newer nested format")
               for line in capsys.readouterr().out.splitlines())


@pytest.mark.slow
def test_two_ranks_share_the_encoding_and_agree_with_one(tmp_path):
    """higgs-ddp prepare --nproc-per-node 2 (torchrun under the hood): each rank encodes a share, into its own
    shards; same codes as 1 process."""
    import os
    import subprocess
    import sys


    base = tmp_path / "ds"
    m = _corpus(base, n=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = ["-m", "higgs_ddp", "prepare", "--nproc-per-node", "2", "--config", str(TINY), f"data.manifest={m}", f"output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'two'}", "data.num_workers=1"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 audio references to 8 files (8 distinct recordings): 0 cached, 8 encoded, 0 with problems" in proc.stdout
    shards = list((tmp_path / "two").glob("*/part-*.safetensors"))
    assert len(shards) == 8  # one per piece (of a line each, piece_prepare.py), the ranks' pieces alternating

    one = prepare.prepare_audio(_refs(tmp_path, m), str(tmp_path / "one"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    two = prepare.prepare_audio(_refs(tmp_path, m), str(tmp_path / "two"), "tiny", None, 30, DistEnv(), 0, quiet=True)
    assert two.stats["encoded"] == 0
    for path, codes in one.codes.items():
        assert np.array_equal(two.codes[path], codes)

    bad = write_manifest(base, [{"text": "x", "audio": "missing.wav"}], "bad.jsonl")
    proc = subprocess.run([sys.executable, "-m", "higgs_ddp", "prepare", "--config", str(TINY), f"data.manifest={bad}",
                           f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'two'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2 and f"{bad}:1: audio missing.wav not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_codec_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from higgs_ddp.cli import prepare as main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = tiny_config(tmp_path, samples=4, audio=True)
    assert main(["--config", str(TINY), f"data.manifest={cfg.data.manifest[0]}", f"output_dir={tmp_path / 'o'}",
                 f"data.cache_dir={tmp_path / 'c'}", "data.codec=bosonai/no-such-codec"]) == 2
    err = capsys.readouterr().err
    assert "higgs-ddp: error: cannot fetch the audio codec bosonai/no-such-codec@main" in err
    assert "Traceback" not in err


def test_validation_never_learns_a_recording_training_learns_under_another_path_or_id(tmp_path, tokenizer):
    """The same recording as a copy, under a symlink, or the same file under another id is one recording:
    a validation sample learning it would score memorised data (issue 30, item 2)."""
    import shutil

    from higgs_ddp.data.dataset import _in_val

    base = tmp_path / "ds"
    train = _corpus(base, n=4)
    shutil.copy(base / "clips/0.wav", base / "clips/copy.wav")
    (base / "clips/link.wav").symlink_to(base / "clips/1.wav")
    val = write_manifest(base, [{"text": "copy", "audio": "clips/copy.wav"}, {"text": "link", "audio": "clips/link.wav"},
                                {"text": "new", "audio": wav(base, "clips/new.wav", text="new one")}], "val.jsonl")
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, train, f"data.val_manifest={val}")
    assert str(ei.value).splitlines()[1:] == [
        f"{val}:1: validation sample learns clips/copy.wav, the same recording (identical bytes) as clips/0.wav, "
        f"which the training sample at {train}:1 learns",
        f"{val}:2: validation sample learns clips/link.wav, which the training sample at {train}:2 learns too"]
    data = load(tmp_path, tokenizer, train, f"data.val_manifest={val}", "data.on_error=skip")
    assert (len(data.train), [r.id for r in data.val]) == (4, ["val:3"])
    assert data.report["skipped_by_reason"] == {"val_in_train": 2}

    # data.val_fraction: the same file under a second id, and a copy, that the split puts in validation
    picked = [f"x{i}" for i in range(200) if _in_val(f"x{i}", 0.5)][:2]
    kept = [f"y{i}" for i in range(200) if not _in_val(f"y{i}", 0.5)][:4]
    lines = [{"text": f"line {i}", "audio": f"clips/{i}.wav", "id": kept[i]} for i in range(4)]
    lines += [{"text": "again", "audio": "clips/2.wav", "id": picked[0]},
              {"text": "copy", "audio": "clips/copy.wav", "id": picked[1]}]
    both = write_manifest(base, lines, "both.jsonl")
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, both, "data.val_fraction=0.5")
    assert str(ei.value).splitlines()[1:] == [
        f"{both}:5: validation sample learns clips/2.wav, which the training sample at {both}:3 learns too",
        f"{both}:6: validation sample learns clips/copy.wav, the same recording (identical bytes) as clips/0.wav, "
        f"which the training sample at {both}:1 learns"]
    # prepare counts what the manifest names and what it holds: 6 references, 5 files, 4 recordings
    prep = prepare.prepare_audio(_refs(tmp_path, both), str(tmp_path / "cache"), "tiny", None, 30, DistEnv(), 0,
                                 quiet=True)
    assert prepare.summary_line(prep.stats).startswith(
        "prepare: 6 audio references to 5 files (4 distinct recordings): 4 cached, 0 encoded, 0 with problems")


def _mp3(path: Path, seconds: float, declared_extra_frames: int = 0) -> Path:
    """A real MP3 (libsndfile's LAME encoder). ``declared_extra_frames``: its Xing tag counts that many more
    MPEG frames than it holds, so the header declares more samples than decode, as the tag lame 3.100
    writes can (61,920 declared, 61,632 decoded)."""
    sf.write(path, text_to_wave("mp3 " * 20)[: int(seconds * SR)], SR, format="MP3")
    data = bytearray(path.read_bytes())
    at = data.index(b"Xing") + 8  # after the tag's flags: the frame count, big-endian
    data[at:at + 4] = (int.from_bytes(data[at:at + 4], "big") + declared_extra_frames).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def test_a_whole_mp3_whose_header_counts_padding_trains_and_a_cut_one_is_refused(tmp_path, tokenizer):
    """libsndfile's frame count of an MP3 may include encoder padding: a whole file is not "truncated" for
    decoding a few hundred samples fewer; a file cut short still is, and so is a cut WAV (issue 30, item 3)."""
    from higgs_ddp.data.audio import read_audio

    base = tmp_path / "ds"
    base.mkdir()
    whole = _mp3(base / "whole.mp3", 0.6, declared_extra_frames=1)
    info = sf.info(str(whole))
    wave, sr = read_audio(whole, "whole.mp3", 0)
    assert sr == SR and 0 < info.frames - len(wave) < 576  # declared more than decodes, within one MPEG frame
    cut = base / "cut.mp3"
    cut.write_bytes(_mp3(base / "full.mp3", 0.6).read_bytes()[:-400])
    m = write_manifest(base, [{"text": "whole", "audio": "whole.mp3"}, {"text": "cut", "audio": "cut.mp3"},
                              {"text": "ok", "audio": wav(base, "ok.wav")}])
    with pytest.raises(DataError) as ei:
        load(tmp_path, tokenizer, m)
    problems = str(ei.value).splitlines()[1:]
    assert len(problems) == 1 and problems[0].startswith(f"{m}:2: audio cut.mp3 is truncated: header says 4800 "
                                                         "samples"), problems
    data = load(tmp_path, tokenizer, m, "data.on_error=skip")
    assert sorted(r.id for r in data.train) == ["manifest:1", "manifest:3"]


def test_prepare_leaves_a_runs_records_alone_and_its_repeated_error_line_names_the_problem(tmp_path, capfd):
    """prepare writes its report beside the codes, never over a run's data_report.json (issue 30, item 10);
    a data error's first line, the one repeated last below torchrun's output, names the first problem
    (item 13)."""
    import sys

    from higgs_ddp.cli import launch_ranks
    from higgs_ddp.cli import prepare as main

    base = tmp_path / "ds"
    m = _corpus(base, n=3)
    run = tmp_path / "run"
    run.mkdir()
    (run / "data_report.json").write_text('{"the finished run": "its report"}')
    args = ["--config", str(TINY), *QUIET, f"output_dir={run}", f"data.cache_dir={tmp_path / 'c'}",
            "data.num_workers=0"]
    assert main([*args, f"data.manifest={m}"]) == 0
    assert [p.name for p in run.iterdir()] == ["data_report.json"]
    assert (run / "data_report.json").read_text() == '{"the finished run": "its report"}'
    assert json.loads((tmp_path / "c" / "prepare_report.json").read_text())["train_samples"] == 3
    capfd.readouterr()

    bad = write_manifest(base, [{"text": "x", "audio": "clips/0.wav"}, {"text": "y", "audio": "gone.wav"}], "bad.jsonl")
    # launch_ranks repeats a rank's last error line below all output (here one process, not torchrun)
    assert launch_ranks([sys.executable, "-m", "higgs_ddp", "prepare", *args, f"data.manifest={bad}"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == (f"higgs-ddp: error: 1 problem(s) in the data, the first: {bad}:2: audio gone.wav not found "
                       f"(full list: {tmp_path / 'c' / 'prepare_report.json'}; data.on_error=skip trains on the rest)")
    assert (run / "data_report.json").read_text() == '{"the finished run": "its report"}'
