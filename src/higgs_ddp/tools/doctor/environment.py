"""Environment checks: Python, the version pins of setup.py, transformers and boson_multimodal, CUDA and NCCL."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Optional

from higgs_ddp.tools.doctor.result import FAIL, OK, WARN, Result, _first_line

SUPPORTED_PYTHON = ((3, 11), (3, 12))
PINNED = ("torch", "torchaudio", "torchvision", "boson-multimodal", "transformers", "peft")
BOSON_TRANSFORMERS = ">=4.45.1,<4.47"  # what boson-multimodal 0.1.1 imports with


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
        from higgs_ddp.model import _import_higgs

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
