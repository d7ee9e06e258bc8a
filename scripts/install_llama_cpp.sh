#!/usr/bin/env bash
# Installs llama.cpp's runtime and its own HF->GGUF converter, of one llama.cpp commit, into a
# virtualenv, for the GGUF exports (llm_finetune/exports/gguf.py):
#   - llama-cpp-python (libllama: runs GGUF files, quantizes with llama_model_quantize). PyPI
#     has it as an sdist only, so the first install on a machine compiles llama.cpp (~7.5 min
#     on 2 cores); pip keeps the wheel it built in its cache and later installs reuse it
#     (~5 s). The build is for this machine's CPU (-march=native: AVX-512 here), so do not
#     share that cache with machines of another CPU type (a CI cache restored elsewhere).
#   - the converter of the SAME commit, taken from that sdist (vendor/llama.cpp):
#     convert_hf_to_gguf.py, conversion/, gguf-py/ and LICENSE, under VENV/share/llama.cpp,
#     and that gguf-py (gguf 0.19.0) installed into VENV. PyPI's `convert-hf-to-gguf` is not
#     used: it overwrites the gguf package's files with its own copy. And sentencepiece,
#     which the converter imports.
# Idempotent: what is already there is kept. Usage: scripts/install_llama_cpp.sh VENV
set -euo pipefail

VERSION=0.3.36

fail() {
    echo "install_llama_cpp.sh: $*" >&2
    exit 1
}

[ $# -eq 1 ] || fail "usage: scripts/install_llama_cpp.sh VENV"
venv=$1
python=$venv/bin/python
[ -x "$python" ] || fail "no Python at $python: create the virtualenv first (make setup)"
share=$venv/share/llama.cpp
stamp=$share/.llama-cpp-python-$VERSION

installed_version() {
    "$python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}

if [ "$(installed_version llama_cpp_python)" != "$VERSION" ]; then
    echo "installing llama-cpp-python==$VERSION (the first time on a machine compiles" \
        "llama.cpp, ~7.5 min on 2 cores; pip caches the wheel for later installs)"
    start=$SECONDS
    "$python" -m pip install --quiet "llama-cpp-python==$VERSION" \
        || fail "pip could not install llama-cpp-python==$VERSION (building it needs a C++" \
            "compiler and cmake: apt-get install build-essential cmake); see pip's output above"
    echo "llama-cpp-python installed in $((SECONDS - start)) s"
fi

if [ ! -f "$stamp" ]; then
    echo "unpacking llama.cpp's converter of llama-cpp-python $VERSION into $share"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$python" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$work" \
        || fail "pip could not download the llama-cpp-python==$VERSION sdist; see its output above"
    vendor=llama_cpp_python-$VERSION/vendor/llama.cpp
    tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work" \
        "$vendor/convert_hf_to_gguf.py" "$vendor/conversion" "$vendor/gguf-py" "$vendor/LICENSE" \
        || fail "the llama-cpp-python==$VERSION sdist lacks llama.cpp's converter files"
    rm -rf "$share"
    mkdir -p "$(dirname "$share")"
    mv "$work/$vendor" "$share"
    "$python" -m pip install --quiet "$share/gguf-py" \
        || fail "pip could not install gguf-py from $share/gguf-py; see its output above"
    touch "$stamp"
fi

# The converter's own requirements beyond ours (requirements-convert_legacy_llama.txt).
if ! "$python" -c "import sentencepiece" 2>/dev/null; then
    "$python" -m pip install --quiet "sentencepiece>=0.1.98,<0.3.0" \
        || fail "pip could not install sentencepiece, which llama.cpp's converter imports"
fi

"$python" -c "import llama_cpp, gguf, sentencepiece" \
    || fail "llama_cpp, gguf or sentencepiece does not import in $venv after the install"
echo "llama.cpp runtime and converter ready in $venv"
