#!/usr/bin/env bash
# Installs llama.cpp's runtime and its own HF->GGUF converter, of one llama.cpp commit, into a
# virtualenv, for the GGUF exports (llm_finetune/exports/gguf.py):
#   - llama-cpp-python (libllama: runs GGUF files, quantizes with llama_model_quantize). PyPI
#     has it as an sdist only, so the first install on a machine compiles llama.cpp (~5 min
#     on 2 cores) into a wheel kept under ~/.cache/llm-finetune/wheels; later installs reuse
#     it (~5 s).
#   - The build is portable, not -march=native: on x86-64 it uses SSE4.2, AVX, AVX2, FMA, F16C
#     and BMI2 (x86-64-v3: every Intel CPU since Haswell, every AMD since Zen), with AVX-512
#     and AMX off. ggml's AMX kernels segfault in llama_decode on Sapphire Rapids Xeons (the
#     CPUs of the clouds' H100 boxes: llama.cpp issue 20824), and an AVX-512 build dies with
#     SIGILL on AMD EPYC Rome/Milan. A CPU without AVX2 gets a plain x86-64 build; other
#     architectures llama.cpp's default. The wheel's folder is named after the build flags (and
#     for a native build the CPU's features), and pip's own wheel cache is bypassed: pip keys
#     it by the sdist alone, so it would hand any machine sharing it a wheel built elsewhere.
#   - the converter of the SAME commit, taken from that sdist (vendor/llama.cpp):
#     convert_hf_to_gguf.py, conversion/, gguf-py/ and LICENSE, under VENV/share/llama.cpp,
#     and that gguf-py (gguf 0.19.0) installed into VENV. PyPI's `convert-hf-to-gguf` is not
#     used: it overwrites the gguf package's files with its own copy. And sentencepiece,
#     which the converter imports.
# Idempotent: what is already there is kept. Usage: scripts/install_llama_cpp.sh VENV
set -euo pipefail

VERSION=0.3.36
X86_64_V3="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
X86_64="-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF \
-DGGML_F16C=OFF -DGGML_BMI2=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF \
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

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

cpu_has() {
    for flag in "$@"; do
        grep -qw "$flag" /proc/cpuinfo 2>/dev/null || return 1
    done
}

if [ "$(uname -m)" = x86_64 ] && cpu_has avx2 fma f16c bmi2; then
    cmake_args=$X86_64_V3 build=x86-64-v3
elif [ "$(uname -m)" = x86_64 ]; then
    cmake_args=$X86_64 build=x86-64
else  # llama.cpp's default for this architecture: a wheel for this CPU's features only
    cmake_args="" build="$(uname -m)-native-$(grep -m1 -iE '^(flags|features)' /proc/cpuinfo \
        | md5sum | cut -c1-12)"
fi
wheels=${LLM_FINETUNE_CACHE:-$HOME/.cache/llm-finetune}/wheels/llama-cpp-python-$VERSION-$build
built=$venv/.llama-cpp-python-$VERSION-$build

if [ "$(installed_version llama_cpp_python)" != "$VERSION" ] || [ ! -f "$built" ]; then
    if ! ls "$wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python==$VERSION for $build CPUs (once per machine: ~5 min" \
            "on 2 cores; the wheel is kept in $wheels)"
        start=$SECONDS
        mkdir -p "$wheels"
        CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --quiet --no-deps --no-cache-dir \
            --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$wheels" \
            || fail "pip could not build llama-cpp-python==$VERSION (building it needs a C++" \
                "compiler and cmake: apt-get install build-essential cmake); see pip's output above"
        echo "llama-cpp-python built in $((SECONDS - start)) s"
    fi
    "$python" -m pip install --quiet --force-reinstall --no-deps --no-index \
        --find-links "$wheels" "llama-cpp-python==$VERSION" \
        || fail "pip could not install the wheel in $wheels; remove that folder and re-run"
    "$python" -m pip install --quiet "llama-cpp-python==$VERSION" --find-links "$wheels" \
        --only-binary llama-cpp-python \
        || fail "pip could not install llama-cpp-python's dependencies; see its output above"
    rm -f "$venv"/.llama-cpp-python-*
    touch "$built"
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
if "$python" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())" \
    | grep -q "AMX_INT8 = 1"; then
    fail "the llama-cpp-python in $venv runs ggml's AMX kernels, which crash: remove $wheels" \
        "and re-run"
fi
echo "llama.cpp runtime and converter ready in $venv"
