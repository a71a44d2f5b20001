"""llama.cpp as a benchmark peer: `llama-bench` built from the llama-cpp-python sdist's vendored
llama.cpp, once per machine, and run on a GGUF in a child process.

pip's own llama-cpp-python wheel build segfaults on some VMs (ggml's AMX matmul on AMX CPUs:
Q4_1/Q8_0 are AMX types; upstream reports the same crash), so this builds the C++ tools alone,
static, native ISA without AMX:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   (from the package index)
    cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF
          -DCMAKE_{C,CXX}_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ...
    cmake --build build --target llama-bench llama-quantize     (~5 min on 2 cores)

into `~/.cache/xllm_compile/llama.cpp/<version>/bin/`. `python -m
xllm_compile.tools.bench.llama_cpp` builds it and prints where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "xllm_compile" / "llama.cpp" / VERSION


def tool(name: str = "llama-bench") -> Path | None:
    path = root() / "bin" / name
    return path if path.is_file() else None


def build(say=print) -> Path:
    """Build llama-bench (and llama-quantize) if this machine has none yet; returns its path."""
    if (found := tool()) is not None:
        return found
    out = root()
    with tempfile.TemporaryDirectory() as tmp:
        say(f"llama.cpp: pip download llama-cpp-python=={VERSION} (sdist) ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp")
        build_dir = Path(tmp) / "build"
        say("llama.cpp: cmake (native ISA, no AMX, static) and build llama-bench ...")
        subprocess.run(
            [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                f"-DCMAKE_C_FLAGS={NO_AMX}",
                f"-DCMAKE_CXX_FLAGS={NO_AMX}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                "cmake",
                "--build",
                str(build_dir),
                "-j",
                str(os.cpu_count() or 2),
                "--target",
                *TOOLS,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (out / "bin").mkdir(parents=True, exist_ok=True)
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, out / "bin" / name)
    say(f"llama.cpp: built {out / 'bin'}")
    return out / "bin" / "llama-bench"


def bench(gguf: str | Path, threads: int, prompt: int = 0, gen: int = 0, reps: int = 3) -> dict:
    """llama-bench's figures for one test (`prompt` tokens of prefill, or `gen` decode steps):
    {"tok_s": ..., "ms": ...}, ms per decode step or per whole prompt."""
    exe = build()
    args = [
        str(exe),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-r",
        str(reps),
        "-o",
        "json",
        "-p",
        str(prompt),
        "-n",
        str(gen),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-400:]}")
    (row,) = [r for r in json.loads(proc.stdout) if r["n_prompt"] == prompt and r["n_gen"] == gen]
    tok_s = float(row["avg_ts"])
    return {"tok_s": tok_s, "ms": 1000.0 * (1 if gen else prompt) / tok_s}


def quantize(src: str | Path, dst: str | Path, qtype: str) -> Path:
    """llama-quantize --allow-requantize SRC DST QTYPE (e.g. Q8_0 from the Q4_1 file's F32 norms
    and requantized weights)."""
    build()
    subprocess.run(
        [str(root() / "bin" / "llama-quantize"), "--allow-requantize", str(src), str(dst), qtype],
        check=True,
        capture_output=True,
    )
    return Path(dst)


if __name__ == "__main__":
    print(build())
