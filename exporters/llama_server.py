"""llama.cpp's batching HTTP server, `llama-server`, built at the runtime's own commit.

llama-cpp-python's Python server runs one request at a time; llama.cpp's
`llama-server` runs `--parallel N` slots with continuous batching. It is
not on PyPI, so it is built from the same place the converter comes from
(`llama_converter.py`): the sdist of the installed llama-cpp-python, which
vendors llama.cpp at exactly the commit of the runtime that exports and
verifies GGUF files here. The server then reads every file this runtime
reads, with the same kernels.

`install()` (run by `make setup`, or `python -m exporters.llama_server`)
downloads that sdist with pip (or takes `--sdist`), configures the vendored
tree with cmake (Release, `GGML_NATIVE=OFF` for a portable binary like the
runtime's wheel, no curl, static libraries so the binary stands alone),
builds only the `llama-server` target, and moves the binary into
`<venv>/share/fusedeploy/llama-server/<version>/bin/` in one rename: a
build that fails or is interrupted leaves nothing that looks installed.
It takes minutes (a C++ build); it writes how long into `SOURCE`.
Nothing is built when serving: a missing binary is an `error:` line that
says how to build it. `FUSEDEPLOY_LLAMA_SERVER` names another binary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from fusedeploy.errors import UserError

from .llama_converter import DIST, download_sdist, runtime_version

ENV_OVERRIDE = "FUSEDEPLOY_LLAMA_SERVER"
TARGET = "llama-server"
# Portable, self-contained, server only. LLAMA_BUILD_TOOLS is where the server target lives.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DBUILD_SHARED_LIBS=OFF")


def default_dir(version: str | None = None) -> Path:
    return Path(sys.prefix) / "share" / "fusedeploy" / "llama-server" / (version or runtime_version())


def find_server() -> Path | None:
    """The llama-server binary for the installed runtime (or FUSEDEPLOY_LLAMA_SERVER), None if absent."""
    override = os.environ.get(ENV_OVERRIDE)
    path = Path(override) if override else default_dir() / "bin" / TARGET
    return path if path.is_file() and os.access(path, os.X_OK) else None


def server_binary() -> Path:
    """The llama-server binary; a UserError that says how to build it if absent."""
    found = find_server()
    if found:
        return found
    override = os.environ.get(ENV_OVERRIDE)
    how = (f"{ENV_OVERRIDE}={override} is not an executable file" if override else
           f"llama.cpp's llama-server for {DIST} {runtime_version()} is not built")
    raise UserError(f"{how}; run `make setup` or `python -m exporters.llama_server` (a C++ build: cmake and a "
                    "compiler, a few minutes)")


def install(version: str | None = None, dest: Path | None = None, sdist: Path | None = None,
            jobs: int = 2, log=print) -> Path:
    """Build llama-server from the llama-cpp-python sdist of `version` into `dest`/bin (default: the venv's)."""
    version = version or runtime_version()
    dest = dest or default_dir(version)
    if (dest / "bin" / TARGET).is_file():
        return dest
    for tool in ("cmake",):
        if shutil.which(tool) is None:
            raise UserError(f"building {TARGET} needs {tool} on PATH (and a C++17 compiler)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fusedeploy-llama-server-") as tmp:
        tmp = Path(tmp)
        sdist = sdist or download_sdist(version, tmp)
        root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(root)]
            if not members:
                raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/")
            tar.extractall(tmp / "src", members=members, filter="data")
        source, build = tmp / "src" / root, tmp / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        log(f"building {TARGET} from {sdist.name} (cmake, -j{jobs}; minutes) ...")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", TARGET, f"-j{jobs}"], check=True,
                       stdout=subprocess.DEVNULL)
        built = next(iter(sorted(build.glob(f"**/bin/{TARGET}"))), None)
        if built is None:
            raise RuntimeError(f"cmake built no bin/{TARGET} under {build}")
        seconds = time.perf_counter() - t0
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the installed server is for every user of the venv
            (staging / "bin").mkdir()
            shutil.copy2(built, staging / "bin" / TARGET)
            (staging / "SOURCE").write_text(f"{sdist.name} vendor/llama.cpp; cmake {' '.join(CMAKE_FLAGS)}; "
                                            f"built in {seconds:.0f} s with -j{jobs}\n", encoding="utf-8")
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"built {dest / 'bin' / TARGET} in {seconds:.0f} s")
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=f"Build llama.cpp's {TARGET} at the installed runtime's commit.")
    ap.add_argument("--version", help=f"{DIST} version (default: the installed one)")
    ap.add_argument("--sdist", type=Path, help="use this llama_cpp_python-<version>.tar.gz instead of downloading")
    ap.add_argument("--dest", type=Path, help="install here instead of <venv>/share/fusedeploy/llama-server/<version>")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args(argv)
    print(install(args.version, args.dest, args.sdist, jobs=args.jobs) / "bin" / TARGET)


if __name__ == "__main__":
    main()
