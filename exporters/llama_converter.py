"""Where llama.cpp's own Hugging Face -> GGUF converter comes from, and how it is run.

The converter (`convert_hf_to_gguf.py`, its `conversion/` package and the
`gguf-py` it is written against) is taken from the source distribution of the
llama-cpp-python version that is installed, because that sdist vendors
llama.cpp at exactly the commit the runtime was built from: the converter
writes the metadata keys and tensor layouts that this runtime reads, and it
moves with the runtime whenever the llama-cpp-python pin moves. The
alternatives were worse: the `gguf` wheel on PyPI lags llama.cpp (its 0.19.0
differs from the gguf-py vendored in llama-cpp-python 0.3.36 by ~3,500 diff
lines) and ships no converter; `auto-round` 0.16.1 bundles a `conversion/`
package from a different llama.cpp commit (base.py, gemma.py, ... differ from
the runtime's), runs it on PyPI's gguf, and its loader can fetch converter
sources from GitHub, which a build without network access cannot do.

`install()` (run by `make setup`, or `python -m exporters.llama_converter`)
downloads that sdist with pip -- PyPI is the only network it needs -- and
unpacks those three parts into `<venv>/share/fusedeploy/llama.cpp/<version>/`.
Nothing is downloaded when exporting: a missing converter is an `error:` line
that says how to install it. `FUSEDEPLOY_LLAMA_CPP_CONVERTER` names another
folder with the same layout (e.g. a llama.cpp checkout).

The converter runs in a child Python process (`_convert_hf.py`), because it
imports its own gguf-py under the module name `gguf`, which in this process
is the PyPI wheel that the rest of FuseDeploy reads files with.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fusedeploy.errors import UserError

DIST = "llama-cpp-python"
ENV_OVERRIDE = "FUSEDEPLOY_LLAMA_CPP_CONVERTER"
# The parts of llama.cpp the converter needs, relative to the sdist's vendor/llama.cpp.
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def runtime_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{DIST} is not installed; GGUF export needs it (pip install -e .)") from None


def default_dir(version: str | None = None) -> Path:
    return Path(sys.prefix) / "share" / "fusedeploy" / "llama.cpp" / (version or runtime_version())


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py for the installed runtime; a UserError if absent."""
    override = os.environ.get(ENV_OVERRIDE)
    folder = Path(override) if override else default_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "conversion").is_dir():
        how = (f"{ENV_OVERRIDE}={override} has no convert_hf_to_gguf.py and conversion/" if override else
               f"llama.cpp's converter for {DIST} {runtime_version()} is not installed")
        raise UserError(f"{how}; run `make setup` or `python -m exporters.llama_converter`")
    return folder


def download_sdist(version: str, into: Path) -> Path:
    """The llama-cpp-python sdist of `version`, downloaded by pip into the folder `into`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"{DIST}=={version}", "--dest", str(into)], check=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if len(found) != 1:
        raise RuntimeError(f"pip download left {found} in {into}, expected one {DIST} sdist")
    return found[0]


def install(version: str | None = None, dest: Path | None = None, sdist: Path | None = None) -> Path:
    """Unpack the converter from the llama-cpp-python sdist of `version` (default: the installed one)."""
    version = version or runtime_version()
    dest = dest or default_dir(version)
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="fusedeploy-llama-sdist-") as tmp:
        sdist = sdist or download_sdist(version, Path(tmp))
        root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=_mkdir(dest.parent)))
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                members = [m for m in tar.getmembers()
                           if m.name.startswith(root) and m.name[len(root):].split("/")[0] in PARTS]
                for m in members:
                    m.name = m.name[len(root):]
                tar.extractall(staging, members=members, filter="data")
            missing = [p for p in PARTS if not (staging / p).exists()]
            if missing:
                raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp/{', '.join(missing)}")
            digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
            (staging / "SOURCE").write_text(f"{sdist.name} sha256={digest}\n", encoding="utf-8")
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Install llama.cpp's HF->GGUF converter matching the installed runtime.")
    ap.add_argument("--version", help=f"{DIST} version (default: the installed one)")
    ap.add_argument("--sdist", type=Path, help="use this llama_cpp_python-<version>.tar.gz instead of downloading")
    ap.add_argument("--dest", type=Path, help="install here instead of <venv>/share/fusedeploy/llama.cpp/<version>")
    args = ap.parse_args(argv)
    print(install(args.version, args.dest, args.sdist))


if __name__ == "__main__":
    main()
