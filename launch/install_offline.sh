#!/usr/bin/env bash
# Usage: [PYTHON=python3] launch/install_offline.sh [WHEELS=wheels]
# On a GPU machine with no package registry, from the repo root: makes .venv from the wheels
# that launch/fetch_wheels.sh brought, on top of PYTHON's own torch/torchaudio (CUDA builds),
# which pip must not replace; then stamps .venv so `make test`/`make train` don't reach for PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
PYTHON=${PYTHON:-python3}
VENV=.venv VPY=.venv/bin/python
die() { echo "install_offline: $*" >&2; exit 1; }
[ -f "$WHEELS/requirements.txt" ] || die "no $WHEELS/requirements.txt: run 'make wheels' where PyPI is reachable and bring $WHEELS/ along"

# What is not carried must be on the machine already (fetch_wheels.sh lists it).
missing=$("$PYTHON" - "$WHEELS/preinstalled.txt" <<'EOF'
import sys, importlib.metadata as md
for name in open(sys.argv[1]).read().split():
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(name, end=" ")
EOF
) || die "cannot run $PYTHON"
[ -z "$missing" ] || die "$PYTHON lacks ${missing% } (expected preinstalled; not in $WHEELS/)"

# A venv that sees PYTHON's packages. Made --without-pip so no ensurepip is needed (Debian's
# python3 may lack it); pip comes from the carried wheel. If PYTHON is itself a venv (e.g.
# /opt/torch/.venv), --system-site-packages reaches only its *base* interpreter's packages, so a
# .pth adds PYTHON's own site-packages too (after .venv's own: .venv's versions win).
"$PYTHON" -m venv --clear --system-site-packages --without-pip "$VENV"
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_machine_site.pth"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pipwhl=$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -1)
[ -n "$pipwhl" ] || die "no pip wheel in $WHEELS/"
"$VPY" "$pipwhl/pip" install -q --no-index --no-deps --ignore-installed "$pipwhl"

# The resolver keeps every installed package that satisfies the pins (torch/torchaudio==2.11.0,
# torchvision==0.26.0 if there) and installs the rest from WHEELS into .venv, shadowing PYTHON's
# (e.g. transformers 5.x -> 4.46.x). --no-index: it can never fetch, so never replace torch.
# What fetch_wheels.sh carried, then the project itself without its requirements: those are carried, preinstalled,
# or optional (optional.txt: never imported by a GPU run, used where the image has them).
"$VPY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" &&
    "$VPY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e . ||
    die "pip could not install the project from $WHEELS/ alone (see above)"

"$VPY" - "$WHEELS/optional.txt" <<'EOF' || die "the installed environment does not import (see above)"
import sys, importlib.metadata as md
import torch, torchaudio, transformers, peft, torchao, boson_multimodal.model.higgs_audio, higgs_ddp.model
for m in (torch, torchaudio):  # must be the machine's CUDA builds, not a copy in .venv
    assert not m.__file__.startswith(sys.prefix), f"{m.__name__} was installed into .venv"
print(f"install_offline: python {sys.version.split()[0]} torch {torch.__version__} "
      f"torchaudio {torchaudio.__version__} transformers {transformers.__version__} "
      f"boson_multimodal {md.version('boson_multimodal')} peft {peft.__version__} "
      f"cuda_available {torch.cuda.is_available()}")
import os
absent = []
for name in open(sys.argv[1]).read().split() if os.path.exists(sys.argv[1]) else []:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        absent.append(name)
if absent:
    print(f"install_offline: not on this machine (optional, not carried): {' '.join(absent)}")
EOF
# The Makefile's install stamp (same checksum of setup.py), so its targets skip `pip install`.
touch "$VENV/.installed-$(cat setup.py | cksum | cut -d' ' -f1)"
