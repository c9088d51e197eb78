"""Everything the emulated-aarch64 check needs, built once and cached outside the checkout.

Under CACHE (default ~/.cache/qwen35-arm; QWEN35_ARM_CACHE moves it):
- sdist/: the llama-cpp-python 0.3.36 sdist, downloaded with pip (bench_convert.ensure_sdist);
- build-<target>/: llama.cpp cross-built from it for each aarch64 target, and llama_cpp-<target>/
  the sdist's pure-Python `llama_cpp` package with that build's shared libraries in its lib/;
- sysroot/: Debian's arm64 Python 3.11 and the libraries it and llama.cpp load (apt-get download +
  dpkg -x: no debootstrap, no root inside);
- wheels/: aarch64 wheels of our Python dependencies (numpy, gguf, jinja2, click, …);
- pkgroot/qwen35: a link to this checkout (the repository root is the package `qwen35`).

Tools come from Debian's packages (qemu-user, the aarch64 cross compilers), installed with apt-get
when missing. Nothing of the sdist or the builds is ever written inside the checkout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from bench_convert import SDIST_DIR_NAME, ensure_sdist  # noqa: E402

CACHE = Path(os.environ.get("QWEN35_ARM_CACHE", Path.home() / ".cache" / "qwen35-arm"))
# Pi 5 / RK3588 (Cortex-A76: dotprod, so llama.cpp repacks) and Pi 4 (Cortex-A72: plain NEON).
TARGETS = {"armv8.2-a+dotprod": "cortex-a76", "armv8-a": "cortex-a72"}
TOOLS = {"qemu-aarch64": "qemu-user", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
         "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "cmake": "cmake"}
# Debian bookworm's arm64 Python 3.11 and what it (and llama.cpp: libgomp, libstdc++) loads.
SYSROOT_DEBS = ["python3.11", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
                "libstdc++6", "libgcc-s1", "libgomp1", "libffi8", "libssl3", "zlib1g", "libexpat1", "libbz2-1.0",
                "liblzma5", "libncursesw6", "libtinfo6", "libreadline8", "libsqlite3-0", "libuuid1", "libcrypt1",
                "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libk5crypto3", "libkrb5-3", "libkrb5support0",
                "libkeyutils1", "libcom-err2", "libzstd1", "libdb5.3", "media-types"]
WHEELS = ["numpy", "jinja2", "markupsafe", "typing_extensions", "diskcache", "click", "gguf", "safetensors",
          "pyyaml", "tqdm", "requests"]
CMAKE_FLAGS = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
               "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
               "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF",
               "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]


def log(message: str) -> None:
    print(f"[arm] {message}", flush=True)


def run(cmd: list, **kw) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(sudo + ["apt-get", "update", "-qq"], env=env)
    run(sudo + ["apt-get", "install", "-y", "-qq", *missing], env=env, stdout=subprocess.DEVNULL)


def _stamp(directory: Path, key: str) -> Path:
    return directory / f".ready-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_llama_cpp(target: str) -> Path:
    """The sdist's `llama_cpp` package over a build of llama.cpp for `target`; returns its parent."""
    package_root = CACHE / f"llama_cpp-{target}"
    key = " ".join(CMAKE_FLAGS + [target, SDIST_DIR_NAME])
    if _stamp(package_root, key).is_file():
        return package_root
    source = ensure_sdist(CACHE / "sdist")
    build = CACHE / f"build-{target}"
    log(f"cross-building llama.cpp for {target} in {build} (about 2 minutes of both cores)")
    run(["cmake", "-S", source, "-B", build, *CMAKE_FLAGS, f"-DGGML_CPU_ARM_ARCH={target}"],
        stdout=subprocess.DEVNULL)
    run(["cmake", "--build", build, "--target", "llama", "ggml", "-j", str(os.cpu_count() or 2)],
        stdout=subprocess.DEVNULL)
    shutil.rmtree(package_root, ignore_errors=True)
    shutil.copytree(source.parent.parent / "llama_cpp", package_root / "llama_cpp")
    lib = package_root / "llama_cpp" / "lib"
    lib.mkdir(exist_ok=True)
    for so in (build / "bin").glob("*.so*"):
        shutil.copy2(so, lib / so.name)
    _stamp(package_root, key).touch()
    return package_root


def ensure_sysroot() -> Path:
    sysroot = CACHE / "sysroot"
    key = " ".join(SYSROOT_DEBS)
    if _stamp(sysroot, key).is_file():
        return sysroot
    if "arm64" not in subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                                     text=True).stdout.split():
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        run(sudo + ["dpkg", "--add-architecture", "arm64"])
        run(sudo + ["apt-get", "update", "-qq"])
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"downloading {len(SYSROOT_DEBS)} arm64 packages for the aarch64 Python")
    run(["apt-get", "download", "-qq", *(f"{name}:arm64" if name != "media-types" else name for name in SYSROOT_DEBS)],
        cwd=debs)
    shutil.rmtree(sysroot, ignore_errors=True)
    sysroot.mkdir()
    for deb in debs.glob("*.deb"):
        run(["dpkg", "-x", deb, sysroot])
    _stamp(sysroot, key).touch()
    return sysroot


def ensure_wheels() -> Path:
    wheels = CACHE / "wheels"
    key = " ".join(WHEELS)
    if _stamp(wheels, key).is_file():
        return wheels
    log("installing aarch64 wheels of the Python dependencies")
    shutil.rmtree(wheels, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--target", wheels, "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
         "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64",
         "--platform", "manylinux_2_17_aarch64", *WHEELS])
    _stamp(wheels, key).touch()
    return wheels


def ensure_pkgroot() -> Path:
    pkgroot = CACHE / "pkgroot"
    pkgroot.mkdir(parents=True, exist_ok=True)
    link = pkgroot / "qwen35"
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO)
    return pkgroot


def ensure_all() -> dict:
    ensure_tools()
    return {"sysroot": ensure_sysroot(), "wheels": ensure_wheels(), "pkgroot": ensure_pkgroot(),
            "llama_cpp": {target: ensure_llama_cpp(target) for target in TARGETS}}


if __name__ == "__main__":
    print(ensure_all())
