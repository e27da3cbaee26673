"""python -m higgs_ddp.doctor [--config FILE] [overrides]: what would break a run, checked before it starts.

A run that dies on a version mismatch, an uncached model on an offline node, a bad manifest line or a
full disk dies after the queue wait, the download and the model load. Each of those is checked here in
seconds, without loading a model or any audio. One line per check::

    OK   what was checked
    WARN what: why it may matter
    FAIL what: the fix

The exit code is 1 when any line is FAIL, else 0. Without ``--config`` (or overrides) only the
environment is checked (Python, package versions, CUDA/NCCL); with it, also the model and codec sources,
the manifests and the disk space the checkpoints will need. A check that crashes is itself a FAIL line
naming the exception, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import OFFICIAL_REVISION

OK, WARN, FAIL = "OK", "WARN", "FAIL"
SUPPORTED_PYTHON = ((3, 11), (3, 12))
PINNED = ("torch", "torchaudio", "torchvision", "boson-multimodal", "transformers", "peft")
BOSON_TRANSFORMERS = ">=4.45.1,<4.47"  # what boson-multimodal 0.1.1 imports with
HUB_TIMEOUT_S = 10
# When a pretrained model's config.json is neither local nor cached, its size is taken to be the official
# model's: Llama-3.2-3B with a DualFFN audio path in all 28 layers, 8 codebooks of 1024 (5.77B parameters).
OFFICIAL_DIMS = {
    "audio_adapter_type": "dual_ffn_fast_forward", "audio_dual_ffn_layers": list(range(28)),
    "audio_num_codebooks": 8, "audio_codebook_size": 1024,
    "text_config": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                    "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256},
}
BYTES_PER_TRAINABLE = 4 * 3  # fp32 weights + AdamW's two fp32 moments
TEACHERS = {  # HiggsAudioTokenizer(semantic_techer=...) -> the hub model it loads on construction
    "hubert_base_general": "bosonai/hubert_base",
    "hubert_base": "facebook/hubert-base-ls960",
    "wavlm_base_plus": "microsoft/wavlm-base-plus",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


@dataclass
class Result:
    status: str  # OK | WARN | FAIL
    message: str  # "what" for OK, "what: the fix" for WARN / FAIL

    def line(self) -> str:
        return f"{self.status:<4} {' '.join(str(self.message).split())}"  # always one line


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _guarded(name: str, check: Callable, *args) -> list:
    """Run one check; whatever it raises becomes one FAIL line instead of a traceback."""
    try:
        out = check(*args)
    except Exception as e:  # noqa: BLE001 - the doctor itself must never crash
        return [Result(FAIL, f"{name}: {type(e).__name__}: {_first_line(e)}")]
    return out if isinstance(out, list) else [out]


# ------------------------------------------------------------------------------------------ environment


def check_python() -> Result:
    v = sys.version_info
    shown = f"Python {v.major}.{v.minor}.{v.micro}"
    if (v.major, v.minor) in SUPPORTED_PYTHON:
        return Result(OK, shown)
    wanted = " or ".join(f"{a}.{b}" for a, b in SUPPORTED_PYTHON)
    status = FAIL if (v.major, v.minor) < SUPPORTED_PYTHON[0] else WARN
    return Result(status, f"{shown}: supported are {wanted}; create the venv with one of them (make install)")


def _pins() -> tuple[dict, Optional[Result]]:
    """name -> Requirement, from the installed higgs-ddp's metadata (setup.py's install_requires)."""
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        reqs = [Requirement(r) for r in requires("higgs-ddp") or []]
    except PackageNotFoundError:
        return {}, Result(WARN, "higgs-ddp is not installed, so its version pins are not checked: pip install -e .")
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None}, None


def _installed(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _same_release_fix(pins: dict) -> str:
    torch_pin = pins.get("torch")
    spec = "".join(str(s) for s in torch_pin.specifier) if torch_pin else ""
    want = spec[2:] if spec.startswith("==") else "X"
    return f"install the torch and torchaudio pair from the same release (pip install torch=={want} torchaudio=={want})"


def check_versions() -> list:
    """Each pinned package against setup.py's pin; torch and torchaudio against each other; and that
    torchaudio imports (a CUDA torchaudio wheel on a CPU torch fails with libc10_cuda.so missing)."""
    from packaging.version import Version

    pins, warning = _pins()
    out = [warning] if warning else []
    for name in PINNED:
        if name == "transformers":
            continue  # its own check, with boson_multimodal's range
        have, req = _installed(name), pins.get(name)
        spec = str(req.specifier) if req else ""
        fix = _same_release_fix(pins) if name in ("torch", "torchaudio") else f'pip install "{name}{spec}"'
        if have is None:
            out.append(Result(FAIL, f"{name} is not installed: {fix}"))
        elif req is not None and not req.specifier.contains(have, prereleases=True):
            out.append(Result(FAIL, f"{name} {have} does not match setup.py's {name}{spec}: {fix}"))
        else:
            out.append(Result(OK, f"{name} {have}" + (f" ({spec})" if spec else "")))
    torch_v, audio_v = _installed("torch"), _installed("torchaudio")
    if torch_v and audio_v:
        if Version(torch_v).base_version != Version(audio_v).base_version:
            out.append(Result(FAIL, f"torch {torch_v} and torchaudio {audio_v} are different releases: "
                                    f"{_same_release_fix(pins)}"))
        try:
            import torchaudio  # noqa: F401
        except Exception as e:  # OSError (libc10_cuda.so missing), ImportError, RuntimeError
            out.append(Result(FAIL, f"torchaudio {audio_v} does not import with torch {torch_v} ({_first_line(e)}): "
                                    f"{_same_release_fix(pins)}"))
        else:
            out.append(Result(OK, f"torchaudio imports with torch {torch_v}"))
    return out


def check_transformers() -> list:
    """boson_multimodal 0.1.1 imports only with transformers in BOSON_TRANSFORMERS; also import it."""
    from packaging.specifiers import SpecifierSet

    fix = f'pip install "transformers{BOSON_TRANSFORMERS}"'
    have = _installed("transformers")
    if have is None:
        return [Result(FAIL, f"transformers is not installed: {fix}")]
    if not SpecifierSet(BOSON_TRANSFORMERS).contains(have, prereleases=True):
        return [Result(FAIL, f"transformers {have} is outside boson_multimodal's {BOSON_TRANSFORMERS}: {fix}")]
    out = [Result(OK, f"transformers {have} ({BOSON_TRANSFORMERS}, as boson_multimodal needs)")]
    try:
        from .model import _import_higgs

        _import_higgs()
    except Exception as e:
        out.append(Result(FAIL, f"boson_multimodal's HiggsAudioModel does not import ({type(e).__name__}: "
                                f"{_first_line(e)}): "
                                f'pip install "boson-multimodal==0.1.1" {fix[len("pip install "):]}'))
    else:
        out.append(Result(OK, "boson_multimodal's HiggsAudioModel imports"))
    return out


def check_cuda() -> list:
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return [Result(FAIL, "torch.distributed is not available in this torch build: install the official "
                             "torch wheels")]
    if not torch.cuda.is_available():
        out = [Result(WARN, "no CUDA device: training runs on CPU with gloo (fine for the demo)")]
        if not dist.is_gloo_available():
            out.append(Result(FAIL, "gloo is not available in this torch build: install the official torch wheels"))
        return out
    n = torch.cuda.device_count()
    names = Counter(torch.cuda.get_device_name(i) for i in range(n))
    shown = ", ".join(f"{c} x {name}" for name, c in names.items())
    out = [Result(OK, f"CUDA {torch.version.cuda}: {n} device{'s' * (n > 1)} ({shown})")]
    for i in range(n):  # a wheel without kernels for this GPU, or a driver too old, fails here, not mid-run
        try:
            x = torch.ones(8, 8, device=f"cuda:{i}")
            float((x @ x).sum())
        except Exception as e:
            out.append(Result(FAIL, f"cuda:{i} cannot run a kernel ({_first_line(e)}): install a torch build for "
                                    f"this GPU and driver (compare nvidia-smi's CUDA version with torch "
                                    f"{torch.__version__})"))
    old = sorted({torch.cuda.get_device_name(i) for i in range(n) if torch.cuda.get_device_capability(i) < (8, 0)})
    if old:
        out.append(Result(WARN, f"no native bf16 on {', '.join(old)}: set train.precision=fp32 "
                                f"(train.precision=auto uses bf16 on GPUs)"))
    if dist.is_nccl_available():
        version = torch.cuda.nccl.version()
        shown = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        out.append(Result(OK, f"NCCL {shown}"))
    else:
        out.append(Result(FAIL, "NCCL is not available in this torch build, so multi-GPU runs cannot start: "
                                "install the official CUDA torch wheels"))
    return out


# ------------------------------------------------------------------------------ model and codec sources


def hf_cache_dir() -> str:
    """The hub cache the run will read, from the environment as it is now."""
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]
    if env.get("HF_HOME"):
        return os.path.join(env["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hf_offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached(repo: str, filename: str, revision: Optional[str]) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir(), revision=revision)
    return path if isinstance(path, str) else None


def _missing_model_weights(repo: str, revision: Optional[str]) -> list:
    """The weight files of a cached model that are not cached (a sharded checkpoint lists them)."""
    index = _cached(repo, "model.safetensors.index.json", revision)
    if index is None:
        return [] if _cached(repo, "model.safetensors", revision) else ["the weights (model*.safetensors)"]
    shards = sorted(set(json.loads(Path(index).read_text()).get("weight_map", {}).values()))
    missing = [s for s in shards if _cached(repo, s, revision) is None]
    return [f"{len(missing)} of {len(shards)} weight shards"] if missing else []


def _is_local(name: str) -> bool:
    """A path that exists, or anything that cannot be a hub id, is meant as a local folder."""
    return Path(name).expanduser().exists() or not REPO_ID.match(name) or ".." in name


def _hub_source(what: str, key: str, repo: str, revision: Optional[str], files: tuple,
                model_weights: bool = False) -> Result:
    at = f"{repo}@{revision or 'main'}"
    missing = [f for f in files if _cached(repo, f, revision) is None]
    if not missing and model_weights:
        missing = _missing_model_weights(repo, revision)
    if not missing:
        return Result(OK, f"{what} {at}: in the HF cache ({hf_cache_dir()})")
    download = f"`huggingface-cli download {repo}" + (f" --revision {revision}`" if revision else "`")
    gap = f"{', '.join(missing)} not in the HF cache ({hf_cache_dir()})"
    if hf_offline():
        return Result(FAIL, f"{what} {at}: {gap} and HF_HUB_OFFLINE is set: download it where there is network "
                            f"with {download} into the same HF_HOME, or set {key} to a local folder")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return Result(FAIL, f"{what} {at}: {gap}, and the repo is gated: accept its terms on huggingface.co and "
                            f"set HF_TOKEN (or run `huggingface-cli login`), then {download}")
    except RevisionNotFoundError:
        return Result(FAIL, f"{what} {at}: the hub has no revision {revision!r} of {repo}: check the revision")
    except RepositoryNotFoundError:
        return Result(FAIL, f"{what} {at}: no such repo on the hub (or it is private: set HF_TOKEN): check {key}")
    except Exception as e:  # network down, proxy, DNS, timeout
        from huggingface_hub import constants

        reason = _first_line(e)
        if "Max retries" in reason or "timed out" in reason.lower() or len(reason) > 120:
            reason = f"cannot connect to {constants.ENDPOINT} (timeout {HUB_TIMEOUT_S} s)"
        return Result(FAIL, f"{what} {at}: {gap} and the hub is not reachable ({type(e).__name__}: {reason}): "
                            f"check the network (HTTPS_PROXY), set HF_TOKEN if the repo needs one, or download "
                            f"it elsewhere with {download} and copy the HF cache")
    return Result(OK, f"{what} {at}: reachable on the hub; {gap}: downloaded when the run starts")


def _local_model_folder(path: Path, need_tokenizer: bool) -> list:
    """What a boson_multimodal-format checkpoint folder lacks (empty: nothing)."""
    missing = []
    config = path / "config.json"
    if not config.is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if need_tokenizer and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model")):
        missing.append("tokenizer files (tokenizer.json, tokenizer_config.json; or set model.tokenizer)")
    return missing


def _wrong_format(name: str, config: Path) -> Optional[Result]:
    """A config.json that boson_multimodal cannot load (e.g. the hub repo's later transformers>=5.3 format)."""
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type == "higgs_audio":
        return None
    return Result(FAIL, f"model {name}: config.json has model_type {model_type!r}, not 'higgs_audio': this is not "
                        f"the boson_multimodal checkpoint format (for the official repo use model.revision="
                        f"{OFFICIAL_REVISION})")


def check_model(cfg) -> list:
    m = cfg.model
    if m.init == "random":
        return [Result(OK, "model: random init from model.config (nothing to download)")]
    name = m.path
    tokenizer_from_path = m.tokenizer in (None, m.path)
    out = []
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            return [Result(FAIL, f"model {name}: no such folder (and not a hub id): set model.path to a "
                                 f"boson_multimodal-format checkpoint folder or a hub id")]
        missing = _local_model_folder(path, tokenizer_from_path)
        if missing:
            return [Result(FAIL, f"model {name}: the folder has no {'; no '.join(missing)}: point model.path at "
                                 f"a boson_multimodal-format checkpoint (config.json, *.safetensors, tokenizer)")]
        wrong = _wrong_format(name, path / "config.json")
        if wrong:
            return [wrong]
        out.append(Result(OK, f"model {name}: local checkpoint folder (config.json, weights"
                              f"{', tokenizer' if tokenizer_from_path else ''})"))
    else:
        files = ("config.json", "tokenizer_config.json") if tokenizer_from_path else ("config.json",)
        out.append(_hub_source("model", "model.path", name, m.revision, files, model_weights=True))
        cached = _cached(name, "config.json", m.revision)
        wrong = cached and _wrong_format(f"{name}@{m.revision or 'main'}", Path(cached))
        if wrong:
            out.append(wrong)
    if not tokenizer_from_path and m.tokenizer != "tiny":
        if _is_local(m.tokenizer):
            ok = Path(m.tokenizer).expanduser().is_dir() and \
                any((Path(m.tokenizer) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
            out.append(Result(OK, f"tokenizer {m.tokenizer}: local folder") if ok else Result(
                FAIL, f"tokenizer {m.tokenizer}: no folder with tokenizer.json or tokenizer_config.json: "
                      f"check model.tokenizer"))
        else:
            out.append(_hub_source("tokenizer", "model.tokenizer", m.tokenizer, None, ("tokenizer_config.json",)))
    return out


def _codec_config(name: str, revision: Optional[str]) -> Optional[dict]:
    path = Path(name) / "config.json" if _is_local(name) else _cached(name, "config.json", revision)
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def check_codec(cfg, needed: bool) -> list:
    name, revision = cfg.data.codec, cfg.data.codec_revision
    if name == "tiny":
        return [Result(OK, "codec: tiny (random weights, built offline)")]
    if not needed:
        return [Result(OK, f"codec {name}: not needed (every clip is given as .npy codes, no eval.prompts)")]
    out = []
    if _is_local(name):
        path = Path(name).expanduser()
        missing = [f for f in ("config.json", "model.pth") if not (path / f).is_file()]
        if not path.is_dir() or missing:
            what = "no such folder" if not path.is_dir() else f"the folder has no {' and no '.join(missing)}"
            return [Result(FAIL, f"codec {name}: {what}: set data.codec to the Higgs audio tokenizer's folder "
                                 f"(config.json + model.pth), a hub id, or tiny")]
        out.append(Result(OK, f"codec {name}: local folder (config.json, model.pth)"))
    else:
        out.append(_hub_source("codec", "data.codec", name, revision, ("config.json", "model.pth")))
    config = _codec_config(name, revision)
    if config is not None:  # the codec builds its semantic teacher from the hub when it is constructed
        teacher = TEACHERS.get(config.get("semantic_techer", "hubert_base_general"))
        if teacher:
            out.append(_hub_source("codec teacher", "data.codec", teacher, None, ("config.json",)))
    return out


# --------------------------------------------------------------------------------------------- manifests


def _manifest_paths(cfg) -> list:
    return [("manifest", p) for p in cfg.data.manifest] + [("val manifest", p) for p in cfg.data.val_manifest]


def check_manifests(cfg, seen: Optional[dict] = None) -> list:
    """Each manifest: exists, readable, every line parses (the training parser, so the same verdict), and
    every audio / codes file it names exists. No audio is read. ``seen`` collects the entries."""
    from .manifest import Problem, read_manifest

    if not cfg.data.manifest:
        return [Result(FAIL, "data.manifest is empty: set data.manifest=path/to/train.jsonl")]
    skip = cfg.data.on_error == "skip"
    out, exists = [], {}
    for what, path in _manifest_paths(cfg):
        p = Path(path)
        if not p.is_file():
            out.append(Result(FAIL, f"{what} {path}: not found: check data.{what.replace(' ', '_')} (a relative "
                                    f"path is taken from the working directory, then from the config file's folder)"))
            continue
        try:
            with p.open("rb") as f:
                lines = sum(1 for line in f if line.strip())
        except OSError as e:
            out.append(Result(FAIL, f"{what} {path}: not readable ({e.strerror}): fix its permissions"))
            continue
        entries, problems = read_manifest(path, cfg.data.root, cfg.data.allow_outside_root)
        for entry in entries:
            for ref in entry.audio:
                if ref.path not in exists:  # a reference clip is often shared by many lines
                    exists[ref.path] = ref.path.is_file()
                if not exists[ref.path]:
                    problems.append(Problem(entry.where, "file_missing", f"{'codes file' if ref.is_codes else 'audio'} "
                                                                         f"{ref.shown} not found"))
        problems.sort(key=lambda pr: int(pr.where.rsplit(":", 1)[1]))  # in file order
        if seen is not None:
            seen[path] = entries
        if not problems and not entries:
            out.append(Result(FAIL, f"{what} {path}: no samples in it: write one JSON object per line"))
        elif problems:
            listed = "; ".join(str(pr) for pr in problems[:3]) + ("; ..." if len(problems) > 3 else "")
            fix = ("skipped and counted at the start (data.on_error=skip)" if skip
                   else "fix these lines, or set data.on_error=skip to train on the rest")
            out.append(Result(WARN if skip else FAIL, f"{what} {path}: {len(problems)} problem"
                                                      f"{'s' * (len(problems) > 1)} in {lines} lines: {listed}: {fix}"))
        else:
            out.append(Result(OK, f"{what} {path}: {len(entries)} sample{'s' * (len(entries) > 1)}, every line "
                                  f"parses, every file it names exists"))
    return out


def check_prompts(cfg) -> list:
    """eval.prompts: each reference_audio exists (a path from the working directory); nothing is decoded."""
    out = []
    for i, prompt in enumerate(cfg.eval.prompts):
        key, ref = f"eval.prompts[{i}]", prompt.get("reference_audio")
        if prompt.get("reference_text") and not ref:
            out.append(Result(FAIL, f"{key} has a reference_text but no reference_audio: add the reference's audio "
                                    f"or drop its text"))
        elif ref and not Path(ref).is_file():
            out.append(Result(FAIL, f"{key}.reference_audio {ref}: not found (a path from the working directory): "
                                    f"fix the path" + (" or run `make demo` first" if "runs/tiny" in ref else "")))
    if cfg.eval.prompts and not out:
        refs = sum(bool(p.get("reference_audio")) for p in cfg.eval.prompts)
        out.append(Result(OK, f"eval.prompts: {len(cfg.eval.prompts)} prompt{'s' * (len(cfg.eval.prompts) > 1)}"
                              f", {refs} reference audio file{'s' * (refs != 1)} found"))
    return out


# ------------------------------------------------------------------------------------------------- disk


@dataclass
class Dims:
    """What the parameter count depends on, from a HiggsAudioConfig dict (model.config or config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attention_bias: bool
    mlp_bias: bool
    dual_layers: list
    audio_attention: bool
    audio_vocab: int  # codebooks x (codebook size + stream BOS/EOS)

    @classmethod
    def from_config(cls, raw: dict) -> "Dims":
        from transformers import LlamaConfig

        text = LlamaConfig(**dict(raw.get("text_config") or {}))
        if not (raw.get("text_config") or {}).get("vocab_size"):
            text.vocab_size = 128256  # the Llama-3 tokenizer the real model uses
        adapter = raw.get("audio_adapter_type", "stack")
        dual = sorted(raw.get("audio_dual_ffn_layers") or []) if adapter.startswith("dual_ffn") else []
        return cls(
            hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size, attention_bias=bool(getattr(text, "attention_bias", False)),
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            dual_layers=[i for i in dual if 0 <= i < text.num_hidden_layers],
            audio_attention=adapter == "dual_ffn" and bool(raw.get("use_audio_out_self_attention")),
            audio_vocab=int(raw.get("audio_num_codebooks", 12)) * (int(raw.get("audio_codebook_size", 1024)) + 2),
        )

    def linears(self) -> list:
        """(module name, in, out, bias) of every Linear in the decoder layers, the way the model names them."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
        mlp = [("gate_proj", h, self.intermediate), ("up_proj", h, self.intermediate),
               ("down_proj", self.intermediate, h)]
        out = []
        for i in range(self.layers):
            parts = [("self_attn", attn, self.attention_bias), ("mlp", mlp, self.mlp_bias)]
            if i in self.dual_layers:
                parts.append(("audio_mlp", mlp, self.mlp_bias))
                if self.audio_attention:
                    parts.append(("audio_attn", attn, self.attention_bias))
            for block, mods, bias in parts:
                out += [(f"layers.{i}.{block}.{name}", n_in, n_out, bias) for name, n_in, n_out in mods]
        out += [("audio_decoder_proj.text_lm_head", h, self.vocab, False),
                ("audio_decoder_proj.audio_lm_head", h, self.audio_vocab, False)]
        return out

    def audio_norms(self) -> int:
        return len(self.dual_layers) * self.hidden * (3 if self.audio_attention else 2)

    def count(self, mode: str, lora_targets: list = (), lora_r: int = 0) -> int:
        """Trainable parameters under train.mode (the Whisper audio tower, always frozen, is left out)."""
        lin = self.linears()
        if mode == "lora":
            def hit(name):
                return any(name == t or name.endswith("." + t) for t in lora_targets)
            return sum(lora_r * (n_in + n_out) for name, n_in, n_out, _ in lin if hit(name))
        if mode == "audio_ffn":
            return sum(n_in * n_out + (n_out if b else 0) for name, n_in, n_out, b in lin
                       if name.startswith("layers.") and ".audio_" in name) + self.audio_norms()
        weights = sum(n_in * n_out + (n_out if b else 0) for _, n_in, n_out, b in lin)
        embeddings = (self.vocab + self.audio_vocab) * self.hidden
        norms = self.layers * 2 * self.hidden + self.hidden + self.audio_norms()
        return weights + embeddings + norms


def _model_config_dict(cfg) -> Optional[dict]:
    """The model's config without loading it: inline for random init, else a local or cached config.json."""
    if cfg.model.init == "random":
        return dict(cfg.model.config or {})
    name = cfg.model.path
    path = Path(name).expanduser() / "config.json" if _is_local(name) else _cached(name, "config.json",
                                                                                     cfg.model.revision)
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def checkpoint_need(cfg) -> tuple[float, int, str]:
    """-> (bytes one checkpoint takes, how many exist at once at most, how the size was estimated).

    A checkpoint holds the trainable weights and AdamW's two moments, all fp32. ``train.keep_last``
    are kept and the next one is written before the oldest is deleted, but never more than the run saves."""
    t = cfg.train
    raw = _model_config_dict(cfg)
    params = Dims.from_config(raw or OFFICIAL_DIMS).count(t.mode, cfg.lora.target_modules, cfg.lora.r)
    per = params * BYTES_PER_TRAINABLE
    how = f"{params:,} trainable parameters x {BYTES_PER_TRAINABLE} B" + \
        ("" if raw is not None else ", sized as the official 3B model: its config is not cached")
    saves = math.ceil(t.max_steps / t.save_every) if t.save_every else 1
    count = min(t.keep_last + 1, saves) if t.keep_last else saves
    return per, count, how


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e9:.4f} GB"


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg, need_bytes: Optional[float] = None) -> Result:
    """Free space where the checkpoints go against what they will take (``need_bytes`` overrides the
    estimate). Less than needed is a FAIL (the run dies at a save); less than twice that is a WARN."""
    out_dir = Path(cfg.output_dir)
    where = _existing_parent(out_dir)
    if not os.access(where, os.W_OK):
        return Result(FAIL, f"output_dir {cfg.output_dir}: {where} is not writable: choose another output_dir")
    if need_bytes is None:
        per, count, how = checkpoint_need(cfg)
        final = per / 3  # output_dir/final: the trainable weights without the optimizer state
        need_bytes = per * count + final
        detail = f"{count:,} checkpoint{'s' * (count > 1)} of {_gb(per)} ({how}) + final weights"
    else:
        detail = "as given"
    free = shutil.disk_usage(where).free
    shown = f"{_gb(free)} free at {where}, checkpoints need about {_gb(need_bytes)} ({detail})"
    if free < need_bytes:
        return Result(FAIL, f"disk: {shown}: free space, point output_dir at a larger disk, or lower train.keep_last")
    if free < 2 * need_bytes:
        return Result(WARN, f"disk: {shown}: little room for logs, samples and anything else on that disk")
    return Result(OK, f"disk: {shown}")


def check_output_dir(cfg) -> list:
    ckpts = Path(cfg.output_dir) / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*") if p.is_dir()) if ckpts.is_dir() else []
    if steps and cfg.train.resume == "never":
        return [Result(FAIL, f"output_dir {cfg.output_dir} already holds {len(steps)} checkpoints and "
                             f"train.resume=never refuses it: use a new output_dir or train.resume=auto")]
    if steps and cfg.train.resume == "auto":
        return [Result(OK, f"output_dir {cfg.output_dir}: resumes from {steps[-1]} (train.resume=auto)")]
    return []


# ------------------------------------------------------------------------------------------------- main


def environment_checks() -> list:
    return [("python", check_python), ("versions", check_versions), ("transformers", check_transformers),
            ("cuda", check_cuda)]


def config_checks(cfg) -> list:
    entries: dict = {}

    def codec():
        refs = [r for es in entries.values() for e in es for r in e.audio]
        parsed_all = len(entries) == len(_manifest_paths(cfg))
        needed = bool(cfg.eval.prompts) or not parsed_all or any(not r.is_codes for r in refs)
        return check_codec(cfg, needed)

    return [("model", lambda: check_model(cfg)), ("manifests", lambda: check_manifests(cfg, entries)),
            ("eval prompts", lambda: check_prompts(cfg)), ("codec", codec),
            ("output_dir", lambda: check_output_dir(cfg)), ("disk", lambda: check_disk(cfg))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m higgs_ddp.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the training config to check (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as train.py takes them")
    args = p.parse_args(argv)
    results = []

    def report(rs):
        for r in rs:
            print(r.line(), flush=True)
            results.append(r)

    for name, check in environment_checks():
        report(_guarded(name, check))
    if args.config or args.overrides:
        from .config import ConfigError, load_config

        cfg = None
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            report([Result(FAIL, f"config: {e}")])
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable file
            report([Result(FAIL, f"config: {type(e).__name__}: {_first_line(e)}")])
        if cfg is not None:
            report([Result(OK, f"config {args.config or '(defaults)'}: train.mode={cfg.train.mode}, "
                               f"model.init={cfg.model.init}, output_dir={cfg.output_dir}")])
            for name, check in config_checks(cfg):
                report(_guarded(name, check))
    fails = sum(r.status == FAIL for r in results)
    warns = sum(r.status == WARN for r in results)
    print(f"doctor: {fails} FAIL, {warns} WARN" + (" (fix the FAIL lines before training)" if fails else ""))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
