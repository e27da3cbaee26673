"""The audio codec behind a small interface: waveform in, (codebooks, frames) codes out.

Two implementations of one class, both boson_multimodal's own ``HiggsAudioTokenizer``:

* the pretrained Higgs audio tokenizer (24 kHz, 8 codebooks of 1024, 25 frames/s), loaded through
  boson_multimodal's ``load_higgs_audio_tokenizer`` from a hub id (pinned revision) or a local folder;
* ``tiny``: the same architecture at toy sizes with seeded random weights and a tiny random HuBERT as
  its semantic teacher, built offline for the demo and the tests.

A codec has an *identity* string, computable without loading any weights, that keys the code cache:
codes from one codec are never served for another.

Clips are encoded one at a time on purpose: the codec's HuBERT teacher normalises over time (group norm)
and attends over the whole clip, so zero-padding clips into one batch would change their codes.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from higgs_ddp.config import OFFICIAL_CODEC, OFFICIAL_CODEC_REVISION, pinned_revision
from higgs_ddp.errors import HiggsError
from higgs_ddp.runtime.lean_imports import trim_transformers

TINY = "tiny"
PIPELINE_VERSION = 1  # bump when decoding / down-mixing / resampling changes what gets encoded


class CodecError(HiggsError, RuntimeError):
    pass


@dataclass(frozen=True)
class TinyCodecSpec:
    """The toy codec: 8 kHz, 25 frames/s (hop 320), 4 codebooks of 64 — matching configs/tiny.yaml."""

    seed: int = 0
    sample_rate: int = 8000
    ratios: tuple = (8, 5, 4, 2)
    num_codebooks: int = 4
    codebook_size: int = 64


def codec_identity(name: str, revision: Optional[str] = None) -> str:
    """What the codes depend on, without loading anything: the cache key's codec half."""
    if name == TINY:
        return f"tiny:{TinyCodecSpec()}:torch-init-v2:pipeline{PIPELINE_VERSION}"
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for fname in ("config.json", "model.pth"):
            f = path / fname
            if not f.is_file():
                raise CodecError(f"codec folder {name} has no {fname}")
            st = f.stat()  # content-addressed would mean hashing the weights on every start
            h.update(f"{fname}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"local:{path.resolve()}:{h.hexdigest()[:16]}:pipeline{PIPELINE_VERSION}"
    return f"hub:{name}@{pinned_revision(name, revision) or 'main'}:pipeline{PIPELINE_VERSION}"


def check_codec_format(config: dict, where: str) -> None:
    """A config.json that boson_multimodal's HiggsAudioTokenizer cannot be built from is one line naming the
    revision that loads: the hub repo's rewrite of April 2026 nests its settings (acoustic_model_config, ...),
    and HiggsAudioTokenizer(**config) then fails with an unexpected keyword argument."""
    import inspect

    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    known = set(inspect.signature(HiggsAudioTokenizer.__init__).parameters)
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        nested = [k for k in unknown if isinstance(config[k], dict)]
        kind = f"the newer nested format ({', '.join(nested)})" if nested else f"a format with {', '.join(unknown)}"
        raise CodecError(f"codec {where}: config.json is in {kind}, which boson-multimodal cannot load; use "
                         f"{OFFICIAL_CODEC} at revision {OFFICIAL_CODEC_REVISION} (the default data.codec_revision, "
                         f"the last snapshot in the format it loads)")


def _tiny_hubert():
    trim_transformers()
    from transformers import HubertConfig, HubertModel

    # HiggsAudioTokenizer hard-codes a 768-wide semantic teacher; everything else is small.
    # Total stride 320 at 8 kHz gives 25 frames/s, the acoustic encoder's rate.
    return HubertModel(HubertConfig(
        hidden_size=768, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 4, 4, 4),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16, feat_extract_norm="group"))


@contextlib.contextmanager
def _tiny_semantic_teacher():
    """HiggsAudioTokenizer fetches its HuBERT teacher from the hub inside __init__; hand it a tiny one."""
    import boson_multimodal.audio_processing.higgs_audio_tokenizer as hat

    class _Offline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return _tiny_hubert()

    original = hat.AutoModel
    hat.AutoModel = _Offline
    try:
        yield hat
    finally:
        hat.AutoModel = original


def tiny_codec_config(spec: TinyCodecSpec = TinyCodecSpec()) -> dict:
    """A config.json for ``load_higgs_audio_tokenizer``, as the pretrained tokenizer ships one."""
    return dict(n_filters=32, D=8, target_bandwidths=[1], ratios=list(spec.ratios), sample_rate=spec.sample_rate,
                bins=spec.codebook_size, n_q=spec.num_codebooks, semantic_techer="hubert_base_general",
                semantic_sample_rate=spec.sample_rate)


def build_tiny_tokenizer_model(spec: TinyCodecSpec = TinyCodecSpec(), device="cpu"):
    import warnings

    with _tiny_semantic_teacher() as hat, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm deprecation inside dac
        state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        try:
            model = hat.HiggsAudioTokenizer(**tiny_codec_config(spec), device=str(device))
            # Codebooks start empty and would be fitted by k-means (with a collective across ranks) on
            # the first audio encoded; give them fixed random entries instead, as trained weights would.
            for m in model.modules():
                if hasattr(m, "inited") and hasattr(m, "embed"):
                    m.embed.normal_()
                    m.embed_avg.copy_(m.embed)
                    m.inited.fill_(1)
        finally:
            torch.random.set_rng_state(state)
    return model.to(device).eval()


def save_tiny_codec_folder(out_dir, spec: TinyCodecSpec = TinyCodecSpec()) -> Path:
    """The tiny codec in the pretrained tokenizer's on-disk format (config.json + model.pth)."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_tokenizer_model(spec)
    (out / "config.json").write_text(json.dumps(tiny_codec_config(spec)))
    torch.save(model.state_dict(), out / "model.pth")
    return out


def shortest_input(encoder: torch.nn.Module) -> int:
    """The fewest samples the acoustic encoder's convolutions take: each needs its padded input at least as
    long as its (dilated) kernel, and each strided one shortens what the next receives. Shorter clips crash
    inside the codec. The semantic teacher's input is padded by 160 samples on each side
    (HiggsAudioTokenizer.get_regress_target), more than its own convolutions need, so it sets no limit."""
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv1d)]  # in the order they run

    def accepts(n: int) -> bool:
        for conv in convs:
            span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
            n += 2 * conv.padding[0]
            if n < span:
                return False
            n = (n - span) // conv.stride[0] + 1
        return True

    n = 1
    while not accepts(n):
        n += 1
    return n


def _codec_config(name: str, revision: Optional[str]) -> dict:
    """The codec's config.json, without its weights."""
    if name == TINY:
        return tiny_codec_config()
    if Path(name).is_dir():
        return _read_codec_config(Path(name) / "config.json", name)
    revision = pinned_revision(name, revision)
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception as e:  # offline, unknown repo, no permission: one line, with the fix
        raise CodecError(f"cannot fetch the audio codec's config {name}@{revision or 'main'} "
                         f"({type(e).__name__}); download it once with network access or set "
                         f"data.codec to a local folder") from None
    return _read_codec_config(path, f"{name}@{revision or 'main'}")


def _read_codec_config(path: Path, where: str) -> dict:
    """A codec's config.json, checked to be in the format boson_multimodal loads."""
    import json

    if not path.is_file():
        raise CodecError(f"codec folder {where} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CodecError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise CodecError(f"{path}: not a codec config (a JSON object)")
    check_codec_format(config, where)
    return config


def codec_rates(name: str, revision: Optional[str] = None) -> tuple[int, int]:
    """(sample rate, code frames per second), from the codec's config alone, as HiggsAudioTokenizer computes
    them: (24000, 25) for the pretrained codec, (8000, 25) for the tiny one."""
    import math

    config = _codec_config(name, revision)
    return int(config["sample_rate"]), math.ceil(config["sample_rate"] / math.prod(config["ratios"]))


def min_input_seconds(name: str, revision: Optional[str] = None, config: Optional[dict] = None) -> float:
    """The shortest clip the codec encodes, from its config alone (the encoder is built on the meta device:
    no weights, no download beyond config.json; ``config``: that file's contents, already read);
    ``Codec.min_seconds`` for a loaded one."""
    import inspect
    import warnings

    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer, dac2

    defaults = {k: p.default for k, p in inspect.signature(HiggsAudioTokenizer.__init__).parameters.items()}
    config = {**defaults, **(config or _codec_config(name, revision))}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm deprecation inside dac
        encoder = dac2.Encoder(64, config["ratios"], config["D"])  # as HiggsAudioTokenizer builds it
    return shortest_input(encoder) / config["sample_rate"]


def local_min_input_seconds(name: str, revision: Optional[str] = None) -> Optional[float]:
    """``min_input_seconds`` from this machine alone (tiny, a local folder, the Hugging Face cache), None when
    a hub codec's config.json was never downloaded: ``manifest stats`` and the doctor never wait on the
    network (offline, the hub's retries take 40 s)."""
    import json

    if name != TINY and not Path(name).is_dir():
        from huggingface_hub import try_to_load_from_cache

        try:
            path = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # huggingface_hub's HFValidationError: not a repo id (a folder that is not there)
            raise CodecError(f"{name} is neither a folder nor a hub id") from None
        if not isinstance(path, str):
            return None
        return min_input_seconds(name, revision, json.loads(Path(path).read_text()))
    return min_input_seconds(name, revision)


class Codec:
    """Wraps a HiggsAudioTokenizer: ``encode(wave)`` takes a mono float waveform at ``sample_rate``."""

    def __init__(self, model, identity: str):
        if any(hasattr(m, "inited") and not bool(m.inited.all()) for m in model.modules()):
            raise CodecError(f"the codec {identity} has uninitialised codebooks (weights not loaded?); "
                             f"encoding would fit them to the data")
        self.model, self.identity = model, identity
        self.sample_rate = int(model.sample_rate)
        self.frame_rate = float(model.frame_rate)
        self.num_codebooks = int(model.n_q)
        self.codebook_size = int(model.quantizer.bins) if hasattr(model.quantizer, "bins") else None
        self.min_samples = shortest_input(model.encoder)
        self.min_seconds = self.min_samples / self.sample_rate  # what audio.read_audio checks

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """(samples,) float -> (num_codebooks, frames) int64 on the CPU.

        The same computation as HiggsAudioTokenizer.encode (which boson's inference engine uses for
        reference audio), minus its librosa file loading and resampling, which happen before this.
        """
        x = wave.to(self.device, torch.float32).reshape(1, 1, -1)
        return self.model._xcodec_encode(x).audio_codes[0].long().cpu()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor):
        """(num_codebooks, frames) -> float waveform (numpy) at ``sample_rate``."""
        return self.model.decode(codes.unsqueeze(0))[0, 0]


def load_codec(name: str, revision: Optional[str] = None, device="cpu") -> Codec:
    identity = codec_identity(name, revision)
    trim_transformers()  # before the codec's HuBERT teacher loads transformers' model classes
    if name == TINY:
        return Codec(build_tiny_tokenizer_model(device=device), identity)
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    path, where = name, name
    if not Path(name).is_dir():
        revision = pinned_revision(name, revision)
        where = f"{name}@{revision or 'main'}"
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, revision=revision)
        except Exception as e:  # offline, unknown repo, no permission: one line, with the fix
            raise CodecError(f"cannot fetch the audio codec {where} "
                             f"({type(e).__name__}); download it once with network access or set "
                             f"data.codec to a local folder") from None
    _read_codec_config(Path(path) / "config.json", where)  # a format boson cannot build: one line, not a traceback
    try:
        model = load_higgs_audio_tokenizer(str(path), device=str(device))
    except OSError as e:
        raise CodecError(f"cannot load the audio codec from {path}: {str(e).splitlines()[0]} "
                         f"(its HuBERT teacher is fetched from the hub on first use)") from None
    return Codec(model, identity)
