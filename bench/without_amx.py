"""Run a Python peer with llama.cpp's AMX buffer type withheld from its model loader, as qwen35
withholds it where AMX does not work (runtime/engine/cpu.py). Where the AMX kernels crash (seen here: the
GCC 12.2 build on an Intel Xeon, SIGSEGV at the first decode of 8 tokens), llama-cpp-python's server and the
sdist's example crash on their first prompt; withheld, they place the weights as qwen35 does (the
other extra buffer types, CPU_REPACK among them, stay on offer), so the bench compares like with like.

    PEER_PYTHON bench/without_amx.py -m llama_cpp.server ARGS…
    PEER_PYTHON bench/without_amx.py path/to/server.py ARGS…

It runs in the peers' venv, which has llama-cpp-python but not qwen35: runtime/engine/cpu.py is loaded by
its path, as a module of a stand-in package over runtime/engine/ (it needs only remembered.py beside it).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import runpy
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "runtime" / "engine"
PACKAGE = "qwen35_engine"  # (a stand-in: the engine's own __init__ would import all of qwen35)


def withhold_amx() -> None:
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True))
    package.__path__ = [str(ENGINE)]
    sys.modules[PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.cpu", ENGINE / "cpu.py")
    cpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cpu  # (its dataclasses look their module up)
    spec.loader.exec_module(cpu)
    extra = cpu.extra_buffers()
    extra.use({name for name, _ in extra.original} - {cpu.AMX})


def main(argv: list[str]) -> None:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: python bench/without_amx.py (-m MODULE | SCRIPT) [ARGS…]")
    withhold_amx()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
