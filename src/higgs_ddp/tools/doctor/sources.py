"""Model and codec sources: the HF cache, offline mode, the hub, local checkpoint and codec folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from higgs_ddp.config import OFFICIAL_REVISION
from higgs_ddp.data.codec import CodecError, check_codec_format
from higgs_ddp.tools.doctor.result import FAIL, OK, Result, _first_line

HUB_TIMEOUT_S = 10
TEACHERS = {  # HiggsAudioTokenizer(semantic_techer=...) -> the hub model it loads on construction
    "hubert_base_general": "bosonai/hubert_base",
    "hubert_base": "facebook/hubert-base-ls960",
    "wavlm_base_plus": "microsoft/wavlm-base-plus",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


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
    if config is not None:
        try:
            check_codec_format(config, name if _is_local(name) else f"{name}@{revision or 'main'}")
        except CodecError as e:
            return [*out, Result(FAIL, str(e))]
        # the codec builds its semantic teacher from the hub when it is constructed
        teacher = TEACHERS.get(config.get("semantic_techer", "hubert_base_general"))
        if teacher:
            out.append(_hub_source("codec teacher", "data.codec", teacher, None, ("config.json",)))
    return out
