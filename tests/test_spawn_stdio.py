"""What a pipe-path child gets, by either spawn route: the same as Popen gives.

Pipe children start through glibc's posix_spawn (``_linux._spawn``) where
the C library has what that needs, else through ``subprocess.Popen``. Every
test here runs on both routes (the ``route`` fixture forces the Popen
fallback for ``"popen"``), so the fallback is exercised on this machine and
any difference between the two routes shows as a failure of one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest
import trio

import trio_observer._linux
import trio_observer._process
from trio_observer import CAPTURE, Session, open_session
from trio_observer._linux import stdio_spawn_supported

from .conftest import children_of, open_fds

PY = sys.executable
pytestmark = pytest.mark.usefixtures("route")


@pytest.fixture(params=["posix_spawn", "popen"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "popen":
        monkeypatch.setattr(trio_observer._process, "stdio_spawn_supported", lambda: False)
    elif not stdio_spawn_supported():
        pytest.skip("the C library lacks posix_spawn chdir/closefrom (glibc < 2.34)")
    return str(request.param)


async def _output(session: Session, argv: list[str], **kwargs: object) -> bytes:
    process = await session.start_process(argv, stdout=subprocess.PIPE, **kwargs)  # type: ignore[arg-type]
    assert process.stdout is not None
    chunks = []
    while chunk := await process.stdout.receive_some():
        chunks.append(chunk)
    assert await process.wait() == 0
    return b"".join(chunks)


async def test_the_posix_spawn_route_is_taken_where_glibc_allows(route: str) -> None:
    calls: list[int] = []
    real = trio_observer._linux.spawn_with_stdio

    def recording(*args: object, **kwargs: object) -> int:
        pid = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(pid)
        return pid

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trio_observer._process, "spawn_with_stdio", recording)
        async with open_session(containment="process-group") as session:
            process = await session.start_process([PY, "-c", "pass"])
            assert await process.wait() == 0
    assert calls == ([process.pid] if route == "posix_spawn" else [])


async def test_cwd_and_a_program_path_relative_to_it(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "py").symlink_to(PY)
    async with open_session(containment="process-group") as session:
        out = await _output(session, ["./py", "-c", "import os; print(os.getcwd())"], cwd=sub)
    assert out.decode().strip() == str(sub)


async def test_bad_cwd_names_the_cwd(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    before = open_fds()
    async with open_session(containment="process-group") as session:
        with pytest.raises(FileNotFoundError) as missing:
            await session.start_process([PY, "-c", "pass"], cwd=tmp_path / "gone")
        with pytest.raises(NotADirectoryError) as not_dir:
            await session.start_process([PY, "-c", "pass"], cwd=a_file)
        # The session goes on.
        assert await (await session.start_process([PY, "-c", "pass"])).wait() == 0
    assert missing.value.filename == str(tmp_path / "gone")
    assert not_dir.value.filename == str(a_file)
    assert open_fds() == before


async def test_path_lookup_uses_the_childs_path_and_names_the_program(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "hello-prog").symlink_to(PY)
    plain = bindir / "plain-prog"
    plain.write_text("print('hi')\n")
    plain.chmod(0o644)
    env = {"PATH": str(bindir)}
    before, children = open_fds(), children_of(os.getpid())
    async with open_session(containment="process-group") as session:
        out = await _output(session, ["hello-prog", "-c", "print('found')"], env=env)
        with pytest.raises(FileNotFoundError) as missing:
            await session.start_process(["no-such-prog-xyz"], env=env, stdout=subprocess.PIPE)
        # Found on PATH but not executable: exec refuses it, as with Popen.
        with pytest.raises(PermissionError) as refused:
            await session.start_process(["plain-prog"], env=env, stdin=subprocess.PIPE)
    assert out == b"found\n"
    assert missing.value.filename == "no-such-prog-xyz"
    assert refused.value.filename == "plain-prog"
    # A failed exec leaves neither a zombie nor a pipe behind.
    assert open_fds() == before
    assert children_of(os.getpid()) == children


_ENV_DUMP = "import json, os; print(json.dumps(dict(os.environ)))"
_RAW_ENV = "import sys; sys.stdout.buffer.write(open('/proc/self/environ', 'rb').read())"


async def test_explicit_env_plus_the_session_id_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # An inherited or given session id (a session inside a session's child)
    # is replaced, never doubled.
    monkeypatch.setenv("TRIO_OBSERVER_SESSION", "outer")
    async with open_session(containment="process-group") as session:
        given = json.loads(
            await _output(
                session, [PY, "-c", _ENV_DUMP], env={"A": "1", "TRIO_OBSERVER_SESSION": "x"}
            )
        )
        raw = await _output(session, [PY, "-c", _RAW_ENV])
    # Python may add LC_CTYPE when it coerces the C locale.
    given.pop("LC_CTYPE", None)
    assert given == {"A": "1", "TRIO_OBSERVER_SESSION": session.id}
    entries = raw.split(b"\0")
    assert [e for e in entries if e.startswith(b"TRIO_OBSERVER_SESSION=")] == [
        f"TRIO_OBSERVER_SESSION={session.id}".encode()
    ]


async def test_only_fds_0_1_2_reach_the_child() -> None:
    leaked_read, leaked_write = os.pipe()
    os.set_inheritable(leaked_read, True)
    code = (
        "import os\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "    except OSError:\n"
        "        return False\n"
        "    return True\n"
        "print([fd for fd in range(64) if is_open(fd)])\n"
    )
    try:
        async with open_session(containment="process-group") as session:
            out = await _output(session, [PY, "-c", code], stdin=leaked_read)
    finally:
        os.close(leaked_read)
        os.close(leaked_write)
    assert out == b"[0, 1, 2]\n"


async def test_the_child_leads_its_own_process_group() -> None:
    code = "import os; print(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getsid(os.getppid()))"
    async with open_session(containment="process-group") as session:
        out = await _output(session, [PY, "-c", code])
    assert out == b"True True\n"


def _mask(status: bytes, field: bytes) -> int:
    for line in status.splitlines():
        if line.startswith(field + b":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field!r} in /proc/self/status")


async def test_signal_dispositions_as_popen_restores_them() -> None:
    # Python ignores SIGPIPE and SIGXFSZ; the child must not inherit that
    # (a `yes | head` child would never die of its closed pipe). Other
    # ignored signals stay ignored, as with Popen (nohup's SIGHUP).
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        async with open_session(containment="process-group") as session:
            status = await _output(session, ["cat", "/proc/self/status"])
    finally:
        signal.signal(signal.SIGUSR2, previous)
    ignored = _mask(status, b"SigIgn")
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert ignored & (1 << (signal.SIGUSR2 - 1))
    assert _mask(status, b"SigBlk") == 0


_WRITE_BOTH = (
    "import sys; data = sys.stdin.read(); "
    "sys.stdout.write('out:' + data); sys.stdout.flush(); sys.stderr.write('err:' + data)"
)


def _open_files(source: Path, out: Path, err: Path) -> tuple[IO[bytes], IO[bytes], IO[bytes]]:
    return open(source, "rb"), open(out, "wb"), open(err, "wb")


async def test_stdio_from_fds_files_devnull_and_stderr_to_stdout(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_text("given")
    async with open_session(containment="process-group") as session:
        # stdin from an fd, stdout to a file object, stderr to an fd.
        stdin, stdout, stderr = _open_files(source, tmp_path / "out", tmp_path / "err")
        with stdin, stdout, stderr:
            process = await session.start_process(
                [PY, "-c", _WRITE_BOTH], stdin=stdin.fileno(), stdout=stdout, stderr=stderr.fileno()
            )
            assert await process.wait() == 0
        # DEVNULL in, and stderr merged into a pipe on stdout.
        merged = await _output(
            session, [PY, "-c", _WRITE_BOTH], stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        # DEVNULL out: nothing arrives anywhere, and the child still runs.
        quiet = await session.start_process(
            [PY, "-c", _WRITE_BOTH], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert quiet.stdout is None
        # Its stdin is inherited here; close it so the read ends.
        captured = await session.start_process(
            [PY, "-c", _WRITE_BOTH], stdin=subprocess.PIPE, stdout=CAPTURE, stderr=CAPTURE
        )
        assert captured.stdin is not None
        await captured.stdin.send_all(b"piped")
        await captured.stdin.aclose()
        assert await captured.wait() == 0
        await captured.wait_output()
        await quiet.wait()
    assert (tmp_path / "out").read_text() == "out:given"
    assert (tmp_path / "err").read_text() == "err:given"
    assert merged == b"out:err:"
    assert captured.stdout_log is not None
    assert captured.stderr_log is not None
    assert captured.stdout_log.snapshot() == b"out:piped"
    assert captured.stderr_log.snapshot() == b"err:piped"


# Run in a child of the test, whose fds 1 and 2 are files: a session there
# starts a program with stdout and stderr swapped (stdout=2, stderr=1). The
# dup2s that lay out fds 0-2 must not read an fd a previous one replaced.
_SWAPPED = """
import subprocess, sys, trio
import trio_observer._linux
import trio_observer._process
from trio_observer import open_session
if sys.argv[1] == "popen":
    trio_observer._process.stdio_spawn_supported = lambda: False
CHILD = (
    "import sys; sys.stdout.write('to-stdout'); sys.stdout.flush(); "
    "sys.stderr.write('to-stderr')"
)
async def main():
    async with open_session(containment="process-group") as session:
        p = await session.start_process(
            [sys.executable, "-c", CHILD], stdin=subprocess.DEVNULL, stdout=2, stderr=1
        )
        assert await p.wait() == 0
trio.run(main)
"""


def test_stdout_and_stderr_swapped(tmp_path: Path, route: str) -> None:
    with open(tmp_path / "one", "wb") as one, open(tmp_path / "two", "wb") as two:
        subprocess.run(
            [PY, "-c", _SWAPPED, route],
            stdin=subprocess.DEVNULL,
            stdout=one,
            stderr=two,
            check=True,
        )
    assert (tmp_path / "one").read_text() == "to-stderr"
    assert (tmp_path / "two").read_text() == "to-stdout"


async def test_rusage_of_the_reap() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.05: pass"
    async with open_session(containment="process-group") as session:
        process = await session.start_process([PY, "-c", burn])
        with trio.fail_after(60):
            assert await process.wait() == 0
    usage = process.resources()
    assert usage.user_seconds is not None
    assert usage.system_seconds is not None
    assert usage.user_seconds + usage.system_seconds >= 0.05
    assert usage.max_rss_bytes is not None
    assert usage.max_rss_bytes > 0


async def test_each_command_gets_its_own_argv_beyond_the_command_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The posix_spawn route keeps the encoded argv of recent commands; a
    # small cache here makes the commands below overflow it more than once.
    monkeypatch.setattr(trio_observer._linux._spawn, "_MAX_COMMANDS", 2)
    script = "import sys; print(sys.argv[1:])"
    async with open_session() as session:
        for args in (["a"], ["b", "c"], ["a"], ["d"], ["b", "c"], []):
            out = await _output(session, [PY, "-c", script, *args])
            assert out == f"{args}\n".encode()
