#!/usr/bin/env bash
# Installs the peer libraries that scripts/peers.py runs as benchmark baselines into the venv of
# $PYTHON (default: the checkout's .venv/bin/python), leaving its torch, torchvision and numpy as
# they are:
#   higher 0.2.1, easyfsl 1.5.0   pure Python, --no-deps. Their dependencies are torch, torchvision,
#                                 matplotlib and tqdm, which metarun already installs. easyfsl also
#                                 lists pandas, but only easyfsl.utils and easyfsl.datasets use it,
#                                 not easyfsl.methods.
#   learn2learn 0.2.0             built from its source release in a temporary folder. The release
#                                 ships C files from Cython 0.29 that do not compile on current
#                                 Python (longintrepr.h is gone), so Cython 3 regenerates them first.
#                                 `import learn2learn` loads its gym, vision and data modules, which
#                                 import gym, scipy and requests, so those are installed too. qpth
#                                 (MetaOptNet's head, imported inside a try) and gsutil (a command
#                                 that QuickDraw's download runs) are not.
# Idempotent: a library that already imports is skipped. Exits non-zero if torch, torchvision or
# numpy changed, or if a peer does not import at the end.
#
#     bash scripts/install_peers.sh            # PYTHON=/path/to/venv/bin/python bash scripts/install_peers.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || { echo "install_peers.sh: no Python at $PYTHON (make install creates .venv)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pinned() {  # the installed torch, torchvision and numpy, as pip constraints
    "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
for name in ("torch", "torchvision", "numpy"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
}
pinned > "$tmp/constraints.txt"
# The constraints stop any dependency resolution from replacing them (e.g. with a CUDA build of torch).
pip_install() { "$PYTHON" -m pip install -q -c "$tmp/constraints.txt" "$@"; }
imports() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }  # quiet: gym prints a notice on import

imports higher || pip_install --no-deps higher==0.2.1
imports easyfsl.methods || pip_install --no-deps easyfsl==1.5.0

if ! imports learn2learn; then
    pip_install gym==0.26.2 scipy requests
    if ! "$PYTHON" -m pip show learn2learn >/dev/null 2>&1; then
        imports setuptools || pip_install setuptools
        pip_install 'cython>=3'
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$tmp" learn2learn==0.2.0
        tar -xzf "$tmp/learn2learn-0.2.0.tar.gz" -C "$tmp"
        src="$tmp/learn2learn-0.2.0"
        for pyx in "$src"/learn2learn/data/*.pyx; do
            "$PYTHON" -m cython -3 "$pyx"  # rewrites the .c file beside it
        done
        # No build isolation: setup.py imports Cython and setuptools from this venv. No deps: its
        # list also names gsutil and qpth, which the modules that peers.py uses do not import.
        pip_install --no-build-isolation --no-deps "$src"
    fi
fi

if ! diff -u "$tmp/constraints.txt" <(pinned) >&2; then
    echo "install_peers.sh: torch, torchvision or numpy changed (diff above)" >&2
    exit 1
fi
"$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import sys

sys.path.insert(0, "scripts")
import peers

errors = {name: error for name, error in peers.available().items() if error}
for name in peers.PEERS:
    print(f"{name} {metadata.version(name)}: {errors.get(name, 'imports')}")
print(f"torch {metadata.version('torch')}")
sys.exit(1 if errors else 0)
EOF
