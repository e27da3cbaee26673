#!/usr/bin/env bash
# Usage: launch/fetch_wheels.sh [DEST=wheels] [PYVER=3.12]
#        launch/fetch_wheels.sh --list [PYVER=3.12]   # only print what would be carried (no download)
# Run where PyPI is reachable. Puts into DEST the wheels that launch/install_offline.sh needs to
# install this project on the GPU machines: Linux x86_64, Python 3.12, no package registry, and
# an image that already holds torch/torchaudio (CUDA builds) and a big numeric stack. The device
# tool carries at most 64 MiB of ignored files, so only what that image lacks or has in a version
# we cannot use is carried; the rest is named in DEST/preinstalled.txt and checked there.
set -euo pipefail
cd "$(dirname "$0")/.."
list=0
if [ "${1:-}" = "--list" ]; then list=1; shift; set -- wheels "$@"; fi
DEST=${1:-wheels}
PYVER=${2:-3.12}
LIMIT_MIB=${LIMIT_MIB:-48}  # what the device tool carries per call is 64 MiB, the rest of the tree included
PY=.venv/bin/python  # its pinned versions are the tested ones; `make install` makes it
[ -x "$PY" ] || { echo "fetch_wheels: no .venv; run 'make install' first" >&2; exit 1; }
mkdir -p "$DEST"

# torch/torchaudio and the CUDA stack they bring: preinstalled, never carried (nor their deps).
EXCLUDE='^(torch|torchaudio|triton|nvidia-.*|cuda-.*)$'
# Big (~170 MiB of wheels with their deps), on the GPU image, and only loosely pinned by what we install
# (e.g. librosa: scipy>=1.6, numba>=0.51; huggingface-hub: hf-xet<2), so the image's copies do.
SYSTEM='numpy scipy llvmlite numba pandas matplotlib scikit-learn pillow grpcio sympy hf-xet'
# On the GPU image too, as the dependencies of its transformers 5.x, peft and torch, in versions that satisfy
# ours (transformers 4.46's own pins are looser than 5.x's for these): used as they are, never carried.
# Not here, so carried: transformers itself (<4.47 for boson-multimodal), tokenizers (<0.21) and huggingface-hub
# (<1.0), which 4.46 needs older than 5.x's; peft (its version on the image is not known to be <0.22).
IMAGE='safetensors tqdm pyyaml regex requests filelock fsspec packaging typing-extensions jinja2 markupsafe
networkx accelerate psutil certifi idna urllib3 charset-normalizer'
IMAGE=$(echo $IMAGE)
# Requirements declared but never imported by boson_multimodal/dac/audiotools (grep and a
# runtime import check); ~55 MiB with their deps (jieba 18, botocore 13, ruff 11, ipython 8).
# Their wheels get these Requires-Dist lines removed and the version tagged +offline.
TRIM='boson-multimodal:jieba,ruff,langid,boto3,s3fs descript-audiotools:ipython'
# Our own requirements that the GPU runs never import and that would not fit: pyarrow (~40 MiB of wheel; only
# `manifest import --format hf` imports it, lazily). Used where the image has it, else that one command is missing;
# install_offline.sh installs the project --no-deps, so it does not ask for them.
OPTIONAL='pyarrow'
# pip itself (the venv is made --without-pip) and the build tools for the editable install
# (pip builds `-e .` in an isolated env from the same wheels); torch wants setuptools<82.
EXTRA="pip==$("$PY" -m pip --version | cut -d' ' -f2) setuptools==80.9.0 wheel==0.45.1"

# Walk the installed metadata from setup.py's requirements (with [test]) down, evaluating markers for the *target*
# Python (the local .venv may be another one), pinning each package at the .venv's version. Our own requirements
# come from setup.py, not from .venv's metadata of higgs-ddp: that is only as new as the last `pip install -e .`
# (a pin added since, e.g. torchao's, went missing from the wheels).
want=$("$PY" - "$PYVER" "$EXCLUDE" "$SYSTEM $IMAGE $OPTIONAL" "$TRIM" <<'EOF'
import ast, re, sys, importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
pyver, excl, system, trim = sys.argv[1], re.compile(sys.argv[2]), set(sys.argv[3].split()), sys.argv[4]
call = next(n for n in ast.walk(ast.parse(open("setup.py").read())) if isinstance(n, ast.Call)
            and getattr(n.func, "id", "") == "setup")
kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
ours = kw["install_requires"] + kw["extras_require"]["test"]
trim = {cn(k): {cn(n) for n in v.split(",")} for k, v in (t.split(":") for t in trim.split())}
env = dict(python_version=pyver, python_full_version=pyver + ".0", sys_platform="linux",
           platform_system="Linux", platform_machine="x86_64", os_name="posix",
           implementation_name="cpython", platform_python_implementation="CPython")
todo, seen, out = [], set(), {}
for r in map(Requirement, ours):
    if not (r.marker and not r.marker.evaluate(env)) and not (excl.match(cn(r.name)) or cn(r.name) in system):
        todo.append((r.name, frozenset(r.extras)))
while todo:
    name, extras = todo.pop()
    if (cn(name), extras) in seen:
        continue
    seen.add((cn(name), extras))
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:  # e.g. a dependency only the target Python has
        out[cn(name)] = f"MISSING:{name}"
        continue
    out[cn(name)] = f"{dist.metadata['Name']}=={dist.version}"
    for r in map(Requirement, dist.requires or []):
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            continue
        if not (excl.match(cn(r.name)) or cn(r.name) in system or cn(r.name) in trim.get(cn(name), ())):
            todo.append((r.name, frozenset(r.extras)))
print("\n".join(sorted(out.values(), key=str.lower)))
EOF
)
missing=$(grep -o '^MISSING:.*' <<<"$want" | cut -d: -f2 | tr '\n' ' ' || true)
[ -z "$missing" ] || { echo "fetch_wheels: needed on Python $PYVER but not in .venv: $missing" >&2; exit 1; }
extra_names=$(printf '%s\n' $EXTRA | cut -d= -f1 | paste -sd'|')
want=$({ grep -viE "^($extra_names)==" <<<"$want" || true; printf '%s\n' $EXTRA; })
if [ $list -eq 1 ]; then
    printf '%s\n' $want
    echo "# optional (not carried, used where the image has it): $OPTIONAL"
    echo "# preinstalled (not carried): torch torchaudio $SYSTEM $IMAGE"
    exit 0
fi

pyv=${PYVER/./}
plat=()  # torch 2.11 itself needs glibc >= 2.28, so any manylinux up to 2_28 runs there
for n in 28 27 26 24 17 12 5; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

# The wheel in DEST for name==version that runs on the target Python (names normalise -/. to _).
have() {
    shopt -s nullglob nocaseglob
    local f
    for f in "$DEST/${1//[-.]/_}-$2"{,+offline}-*.whl; do
        [[ $f =~ -(cp$pyv-cp$pyv|cp3[0-9]*-abi3|py3[0-9]*-none|py2\.py3-none)- ]] && { echo "$f"; break; }
    done
    shopt -u nullglob nocaseglob
}

failed=() keep=()
for spec in $want; do
    name=${spec%%==*} ver=${spec#*==}
    if [ -z "$(have "$name" "$ver")" ]; then
        echo "fetch_wheels: $spec"
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
                --python-version "$PYVER" "${plat[@]}" -d "$DEST" "$spec" 2>/dev/null; then
            # Only an sdist: build the wheel here; only a pure-Python one (*-none-any) will do.
            tmp=$(mktemp -d)
            if log=$("$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp/src" "$spec" 2>&1 &&
                     "$PY" -m pip wheel -q --no-deps -w "$tmp/whl" "$tmp"/src/* 2>&1) &&
               compgen -G "$tmp/whl/*-none-any.whl" >/dev/null; then
                echo "fetch_wheels: built $spec from its sdist"
                mv "$tmp"/whl/*-none-any.whl "$DEST"/
            else
                echo "$log" >&2
            fi
            rm -rf "$tmp"
        fi
    fi
    f=$(have "$name" "$ver")
    if [ -n "$f" ]; then keep+=("$f"); else failed+=("$spec"); fi
done
[ ${#failed[@]} -eq 0 ] || { echo "fetch_wheels: FAILED to get a Python $PYVER wheel for: ${failed[*]}" >&2; exit 1; }

# Drop the unused requirements (TRIM) from those wheels' metadata; +offline marks the change.
for t in $TRIM; do
    for i in "${!keep[@]}"; do
        f=${keep[$i]} b=$(basename "${keep[$i]}")
        n=${t%%:*}
        [[ ${b,,} == "${n//-/_}"-* && $b != *+offline-* ]] || continue
        keep[$i]=$("$PY" - "$f" "${t#*:}" <<'EOF'
import base64, hashlib, os, re, sys, zipfile
from packaging.utils import canonicalize_name as cn
path, drop = sys.argv[1], {cn(n) for n in sys.argv[2].split(",")}
zin = zipfile.ZipFile(path)
old = next(n.split("/")[0] for n in zin.namelist() if n.split("/")[0].endswith(".dist-info"))
ver = old[: -len(".dist-info")].rsplit("-", 1)[1]
new = old.replace(f"-{ver}.", f"-{ver}+offline.")
out = os.path.join(os.path.dirname(path), os.path.basename(path).replace(f"-{ver}-", f"-{ver}+offline-", 1))
digest = lambda b: "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
record = []
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename == f"{old}/RECORD":
            continue
        data = zin.read(info)
        if info.filename == f"{old}/METADATA":
            head, _, body = data.decode().partition("\n\n")
            lines = [l for l in head.split("\n")
                     if not (m := re.match(r"Requires-Dist:\s*([A-Za-z0-9._-]+)", l)) or cn(m[1]) not in drop]
            head = "\n".join(f"Version: {ver}+offline" if l.startswith("Version:") else l for l in lines)
            data = (head + "\n\n" + body).encode()
        info.filename = info.filename.replace(f"{old}/", f"{new}/", 1)
        zout.writestr(info, data)
        record.append(f"{info.filename},{digest(data)},{len(data)}")
    zout.writestr(f"{new}/RECORD", "\n".join(record + [f"{new}/RECORD,,"]) + "\n")
os.remove(path)
print(out)
EOF
)
        echo "fetch_wheels: trimmed $b -> $(basename "${keep[$i]}")"
    done
done

# Drop wheels left from an earlier, different resolution, so DEST stays small and unambiguous.
for f in "$DEST"/*.whl; do
    [[ " ${keep[*]} " == *" $f "* ]] || { echo "fetch_wheels: removing stale $f"; rm -f "$f"; }
done
for f in "${keep[@]}"; do b=$(basename "$f"); echo "${b%%-*}==$(cut -d- -f2 <<<"$b")"; done |
    sort -f >"$DEST/requirements.txt"
printf '%s\n' torch torchaudio $SYSTEM $IMAGE >"$DEST/preinstalled.txt"
printf '%s\n' $OPTIONAL >"$DEST/optional.txt"
bytes=$(cat "${keep[@]}" | wc -c)
mib=$("$PY" -c "print(f'{$bytes / 2**20:.1f}')")
echo "fetch_wheels: ${#keep[@]} wheels for Python $PYVER in $DEST, $mib MiB (limit $LIMIT_MIB); expects preinstalled: torch torchaudio $SYSTEM $IMAGE"
for f in "${keep[@]}"; do printf '%8.2f MiB  %s\n' "$("$PY" -c "import os,sys; print(os.path.getsize(sys.argv[1]) / 2**20)" "$f")" "$(basename "$f")"; done | sort -rn | head -8
if [ "$bytes" -gt $(( LIMIT_MIB * 1048576 )) ]; then
    echo "fetch_wheels: $mib MiB is over the $LIMIT_MIB MiB that fit beside the tree in one device call" >&2; exit 1
fi
