"""The daemon, end to end: a real daemon process on a temporary socket."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

import trio_observer
from trio_observer._daemon._client import DaemonError, RemoteEvent, RemoteMissed, remote_item
from trio_observer._daemon._paths import UnsafeSocketDirectory, prepare_directory
from trio_observer._daemon._protocol import FrameDecoder, encode, hello

from .conftest import PY, children_of


class DaemonProcess:
    def __init__(self, path: Path, process: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.process = process


def start_daemon(
    path: Path,
    *options: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> DaemonProcess:
    """Start a daemon on ``path`` and wait for its "ready"; ``prefix`` runs it (and execs)."""
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(
        [
            *prefix,
            PY,
            "-m",
            "trio_observer",
            "daemon",
            "--socket",
            str(path),
            "--ready-fd",
            str(write_fd),
            *options,
        ],
        pass_fds=[write_fd],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        assert ready.read().startswith(b"ready"), process.communicate(timeout=30)
    return DaemonProcess(path, process)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    directory = tmp_path / "d"
    running = start_daemon(directory / "daemon.sock")
    yield running
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGTERM)
    running.process.communicate(timeout=60)


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children_of(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


async def test_process_outlives_client_and_output_resumes_with_exact_missed(
    daemon: DaemonProcess,
) -> None:
    script = "import sys; sys.stdout.write('a' * 3000 + 'END'); sys.stdout.flush()"
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            started = await client.start([PY, "-c", "import time; time.sleep(60)"], name="sleeper")
            await client.start([PY, "-c", script], name="writer", backlog_bytes=1000)
        # A new client sees the process still running.
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            (default,) = await client.sessions()
            by_name = {p["name"]: p for p in default["processes"]}
            assert by_name["sleeper"]["state"] == "running"
            assert by_name["sleeper"]["pid"] == started["pid"]
            # From offset 0, as a client that has seen nothing: the default
            # is the oldest byte kept, which is 0 only if the writer has
            # not written yet (the test raced the writer on that).
            items = [item async for item in await client.output("writer", offset=0, follow=True)]
            # Offset 100 was evicted: the gap says exactly how much.
            resumed = [item async for item in await client.output("writer", offset=100)]
            assert resumed[0] == trio_observer.OutputGap(2003 - 100)
            assert b"".join(i for i in resumed[1:] if isinstance(i, bytes)).endswith(b"END")
            assert items[0] == trio_observer.OutputGap(2003)
            assert len(b"".join(i for i in items[1:] if isinstance(i, bytes))) == 1000
            stopped = await client.terminate("sleeper", grace_period=5)
            assert stopped["termination"] == "soft-exit"
            assert stopped["exit_code"] == -signal.SIGTERM
            await client.remove("sleeper")
            with pytest.raises(DaemonError, match="no-such-process"):
                await client.remove("sleeper")


async def subscribe_and_leave(
    client: trio_observer.DaemonClient, path: Path, capacity: int
) -> tuple[str, int]:
    """A client subscribes, reads the two events of one process and is SIGKILLed."""
    code = f"""
import sys, trio, trio_observer
async def main():
    async with trio_observer.connect({str(path)!r}, autostart=False) as client:
        stream = await client.subscribe(capacity={capacity})
        print(stream.result["id"], flush=True)
        async for frame in stream:
            print(trio_observer.remote_item(frame).seq, flush=True)
trio.run(main)
"""
    process = await trio.lowlevel.open_process([PY, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None
    lines: list[str] = []
    buffer = b""
    try:
        while len(lines) < 3:
            if len(lines) == 1 and not buffer:
                await run_batch(client, 1)
                buffer = b" "
            chunk = await process.stdout.receive_some()
            assert chunk, "client ended early"
            buffer = buffer.strip(b" ") + chunk
            *done, rest = buffer.split(b"\n")
            lines.extend(d.decode() for d in done)
            buffer = rest
    finally:
        process.kill()  # SIGKILL mid-stream
        await process.wait()
        await process.stdout.aclose()
    return lines[0], int(lines[-1]) + 1


async def run_batch(client: trio_observer._daemon._client.DaemonClient, count: int) -> None:
    for index in range(count):
        await client.start([PY, "-c", "pass"], name=f"p{index}-{os.urandom(3).hex()}")


async def wait_exited(client: trio_observer._daemon._client.DaemonClient) -> None:
    while True:
        sessions = await client.sessions()
        if all(p["state"] == "exited" for s in sessions for p in s["processes"]):
            return
        await trio.sleep(0.05)


@pytest.mark.parametrize("capacity", [4, 256])
async def test_sigkilled_subscriber_resumes_with_exact_missed_count(
    daemon: DaemonProcess, capacity: int
) -> None:
    with trio.fail_after(20):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            # Two events (STARTED, EXITED) per process; the first client
            # takes 2 and is killed; 6 more processes run while nobody reads,
            # then one more once a client has resumed.
            sub_id, next_seq = await subscribe_and_leave(client, daemon.path, capacity)
            assert next_seq == 2
            await run_batch(client, 6)
            await wait_exited(client)
            stream = await client.resume(sub_id, from_seq=next_seq)
            # A loss is reported before the next event delivered after it:
            # one more process makes sure there is one.
            await run_batch(client, 1)
            seen_events = 0
            missed = 0
            expected_seq = next_seq
            while expected_seq < 16:
                item = remote_item(await stream.__anext__())
                if isinstance(item, RemoteMissed):
                    assert item.seq - item.count == expected_seq
                    missed += item.count
                    expected_seq = item.seq
                else:
                    assert isinstance(item, RemoteEvent)
                    assert item.seq == expected_seq
                    seen_events += 1
                    expected_seq += 1
            await stream.aclose()
            status = await client.subscription_status(sub_id)
    # Every one of the 16 events is either received or counted.
    assert next_seq + seen_events + missed == 16
    if capacity == 256:
        assert missed == 0
    else:
        assert missed > 0
        assert status["missed_events"] == missed


async def test_other_uid_is_refused() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to drop to nobody")
    # pytest's tmp_path is not reachable by nobody; this directory is.
    outer = Path(tempfile.mkdtemp(prefix="trio-observer-test-"))
    os.chmod(outer, 0o755)
    running = start_daemon(outer / "d" / "daemon.sock")
    try:
        os.chmod(running.path.parent, 0o755)  # loosened by hand: the uid check still holds
        os.chmod(running.path, 0o666)
        code = f"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.connect({str(running.path)!r})
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data[4:].decode())
"""
        with trio.fail_after(60):
            result = await trio.run_process([PY, "-c", code], capture_stdout=True)
            assert b"permission-denied" in result.stdout
            assert b"uid 65534" in result.stdout
            async with trio_observer.connect(running.path, autostart=False) as client:
                assert (await client.status())["sessions"] == 0
    finally:
        running.process.send_signal(signal.SIGTERM)
        _, stderr = running.process.communicate(timeout=60)
        shutil.rmtree(outer)
    assert b"refused a connection from uid 65534" in stderr


async def raw_exchange(path: Path, payload: bytes) -> list[dict[str, object]]:
    sock = trio.socket.socket(socket.AF_UNIX)
    await sock.connect(str(path))
    stream = trio.SocketStream(sock)
    decoder = FrameDecoder()
    frames = []
    async with stream:
        await stream.send_all(encode(hello()) + payload)
        while data := await stream.receive_some():
            frames.extend(decoder.feed(data))
    return frames


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x00\x00\x00\x03abc", "malformed-frame"),
        (b"\x7f\xff\xff\xff", "oversized-frame"),
        (encode({"type": "wobble"}), "unknown-frame"),
        (encode({"type": "reply", "id": 1, "result": {}}), "unknown-frame"),
    ],
)
async def test_bad_frames_close_only_their_connection(
    daemon: DaemonProcess, payload: bytes, code: str
) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as bystander:
            await bystander.start([PY, "-c", "import time; time.sleep(60)"], name="keep")
            frames = await raw_exchange(daemon.path, payload)
            assert frames[0]["type"] == "hello"
            assert frames[-1]["type"] == "error"
            assert frames[-1]["code"] == code
            # The daemon, its session and the other client go on.
            (session,) = await bystander.sessions()
            assert session["processes"][0]["state"] == "running"
            with pytest.raises(DaemonError, match="unknown-method"):
                await bystander.request("launch-missiles")
            with pytest.raises(DaemonError, match=r"bad-params.*argv"):
                await bystander.request("start", argv="ls")


async def test_two_clients_one_never_reading(daemon: DaemonProcess) -> None:
    with trio.fail_after(120):
        async with trio_observer.connect(daemon.path, autostart=False) as reader:
            await reader.create_session("default")
            # A client that subscribes and never reads a byte again.
            sock = trio.socket.socket(socket.AF_UNIX)
            with sock:
                await sock.connect(str(daemon.path))
                request = {
                    "type": "request",
                    "id": 1,
                    "method": "subscribe",
                    "params": {"capacity": 2},
                }
                await sock.send(encode(hello()) + encode(request))
                # Its sink exists once the reply is here; events before that
                # would not be the stuck sink's to miss.
                decoder = FrameDecoder()
                replied = False
                while not replied:
                    data = await sock.recv(65536)
                    assert data, "the daemon closed the stuck client's connection"
                    replied = any(
                        f.get("type") == "reply" and f.get("id") == 1 for f in decoder.feed(data)
                    )
                stream = await reader.subscribe(capacity=256)
                await run_batch(reader, 20)
                got = 0
                async for frame in stream:
                    assert isinstance(remote_item(frame), RemoteEvent)
                    got += 1
                    if got == 40:
                        break
                # Whether the kernel's socket buffer fills before 40 events
                # (and the sink drops) depends on how the daemon batches its
                # writes; what must hold is that each event was handed on or
                # counted.
                while True:
                    subs = (await reader.request("subscriptions"))["subscriptions"]
                    stuck = next(s for s in subs if s["id"] != stream.result["id"])
                    if stuck["delivered_events"] + stuck["missed_events"] == 40:
                        break
                    assert stuck["delivered_events"] + stuck["missed_events"] < 40, stuck


async def test_sigterm_stops_every_session_and_leaves_nothing(tmp_path: Path) -> None:
    running = start_daemon(tmp_path / "d" / "daemon.sock")
    with trio.fail_after(60):
        async with trio_observer.connect(running.path, autostart=False) as client:
            await client.create_session("s1", grace_period=1)
            await client.create_session("default", grace_period=1)
            await client.start([PY, "-c", "import time; time.sleep(60)"], session="s1")
            await client.start(
                [
                    PY,
                    "-c",
                    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                    " print('ready', flush=True); time.sleep(60)",
                ],
                name="stubborn",
            )
            async for _ in await client.output("stubborn", follow=False):
                pass
            pids = descendants(running.process.pid)
            assert len(pids) >= 2
        running.process.send_signal(signal.SIGTERM)
        await trio.to_thread.run_sync(running.process.communicate)
    assert running.process.returncode == 0
    survivors = [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # noqa: ASYNC240
    assert survivors == []
    assert not running.path.exists()


def test_socket_directory_modes_and_symlink_refused(tmp_path: Path) -> None:
    good = tmp_path / "good"
    prepare_directory(good)
    assert (os.stat(good).st_mode & 0o777) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o700)
    os.chmod(loose, 0o750)
    with pytest.raises(UnsafeSocketDirectory, match="0750"):
        prepare_directory(loose)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(UnsafeSocketDirectory, match="symlink"):
        prepare_directory(link)
    result = subprocess.run(
        [PY, "-m", "trio_observer", "daemon", "--socket", str(link / "daemon.sock")],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert b"symlink" in result.stderr


def test_socket_is_0600(daemon: DaemonProcess) -> None:
    assert (os.stat(daemon.path).st_mode & 0o777) == 0o600
    assert (os.stat(daemon.path.parent).st_mode & 0o777) == 0o700
    assert sys.platform == "linux"


async def test_pty_attach_detach_replays_backlog_and_one_writer(daemon: DaemonProcess) -> None:
    script = (
        "import sys; print('prompt>', flush=True); line = sys.stdin.readline();"
        " print('got', line.strip(), flush=True); sys.stdin.readline()"
    )
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.start([PY, "-c", script], name="tty", pty=(30, 100))
            first = await client.attach("tty")
            assert first.result["writer"] is True
            assert first.result["size"] == {"rows": 30, "cols": 100}
            screen = b""
            async for frame in first:
                screen += base64.b64decode(frame["data"])
                if b"prompt>" in screen:
                    break
            async with trio_observer.connect(daemon.path, autostart=False) as other:
                watcher = await other.attach("tty")
                assert watcher.result["writer"] is False
                with pytest.raises(trio_observer.DaemonError, match="not-writer"):
                    await other.send_input("tty", b"intruder\n")
                # The watcher got the backlog, from the first byte.
                frame = await watcher.__anext__()
                assert base64.b64decode(frame["data"]).startswith(b"prompt>")
            await client.send_input("tty", b"hello\n")
            async for frame in first:
                screen += base64.b64decode(frame["data"])
                if b"got hello" in screen:
                    break
            await first.aclose()  # detach: the process goes on
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            again = await client.attach("tty")
            replay = b""
            async for frame in again:
                replay += base64.b64decode(frame["data"])
                if b"got hello" in replay:
                    break
            assert replay.startswith(b"prompt>")
            (session,) = await client.sessions()
            assert session["processes"][0]["state"] == "running"
            await client.send_input("tty", b"\n")
            async for _ in again:
                pass
            assert (await client.wait("tty"))["exit_code"] == 0


async def test_block_subscription_without_client_is_removed_after_detach_timeout(
    daemon: DaemonProcess,
) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            async with trio_observer.connect(daemon.path, autostart=False) as leaving:
                stream = await leaving.subscribe(
                    capacity=1, backpressure="block", detach_timeout=0.5
                )
                sub_id = stream.result["id"]
            # Nobody reads the BLOCK sink: the session's emitter waits on it
            # until the detach timeout removes it, then goes on.
            for index in range(3):
                await client.start([PY, "-c", "pass"], name=f"b{index}")
            for index in range(3):
                assert (await client.wait(f"b{index}"))["exit_code"] == 0
            status = await client.subscription_status(sub_id)
            assert status["removed"].startswith("detach timeout")
            assert status["attached"] is False
            # What it buffered can still be taken, with the rest counted.
            resumed = await client.resume(sub_id)
            items = [remote_item(frame) async for frame in resumed]
            received = sum(isinstance(i, RemoteEvent) for i in items)
            missed = sum(i.count for i in items if isinstance(i, RemoteMissed))
            # Every event emitted while the sink was registered, and only those.
            assert received + missed == status["delivered_events"] + status["missed_events"]
            assert received == status["delivered_events"] == 1
            assert resumed.end is not None
            assert resumed.end["status"]["ended"] is True
            # Drained after its removal: its end frame said why; it is no
            # longer listed.
            assert resumed.end["status"]["removed"].startswith("detach timeout")
            with pytest.raises(DaemonError, match="no-such-subscription"):
                await client.subscription_status(sub_id)


async def test_frames_lost_in_a_dying_connection_are_resent_or_counted(
    daemon: DaemonProcess,
) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
            streams = {}
            for resend in (8, 1):
                streams[resend] = await client.subscribe(capacity=8, resend=resend)
            await run_batch(client, 1)
            for stream in streams.values():
                # Received here, but say the client died before storing them.
                for _ in range(2):
                    await stream.__anext__()
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            big = await client.resume(streams[8].result["id"], from_seq=0)
            again = [remote_item(await big.__anext__()) for _ in range(2)]
            assert [item.seq for item in again] == [0, 1]
            assert all(isinstance(item, RemoteEvent) for item in again)
            small = await client.resume(streams[1].result["id"], from_seq=0)
            first, second = [remote_item(await small.__anext__()) for _ in range(2)]
            # Only the newest frame was kept: the other is counted, in place.
            assert first == RemoteMissed(seq=1, count=1, lost_in="connection")
            assert isinstance(second, RemoteEvent)
            assert second.seq == 1
            status = await client.subscription_status(streams[1].result["id"])
            assert status["missed_in_resend"] == 1


def test_cli_autostarts_a_daemon_that_outlives_it(tmp_path: Path) -> None:
    path = tmp_path / "cli" / "daemon.sock"
    env = {**os.environ, "TRIO_OBSERVER_SOCKET": str(path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "trio_observer", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    try:
        spawned = cli("spawn", "--name", "echo", "--", PY, "-c", "print('from the daemon')")
        assert '"name":"echo"' in spawned.stdout
        # The spawning client has exited; the daemon it started answers.
        waited = subprocess.run(
            [
                PY,
                "-c",
                f"import trio, trio_observer\n"
                f"async def m():\n"
                f"    async with trio_observer.connect({str(path)!r}, autostart=False) as c:\n"
                f"        print((await c.wait('echo'))['exit_code'])\n"
                f"trio.run(m)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert waited.stdout.strip() == "0"
        assert cli("logs", "echo").stdout == "from the daemon\n"
        assert "echo" in cli("ps").stdout
        status = json.loads(cli("daemon", "status").stdout)
        assert status["processes"] == 1
    finally:
        stopped = subprocess.run(
            [PY, "-m", "trio_observer", "daemon", "stop"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    assert stopped.returncode == 0
    # `daemon stop` returns once every session is down; the process exits
    # right after (it is not our child: wait on a pidfd).
    try:
        pidfd = os.pidfd_open(status["pid"])
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([pidfd], [], [], 30)
        assert readable, "the daemon did not exit after daemon stop"
    finally:
        os.close(pidfd)


async def test_a_connection_reset_by_its_client_leaves_the_daemon_serving(
    daemon: DaemonProcess,
) -> None:
    # Found in the attach tests: a client whose socket was reset (closed
    # with unread data, or killed) made receive_some raise inside the
    # connection's nursery, and the error took the whole daemon down.
    with trio.fail_after(60):
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.path))
            sock.sendall(encode(hello()))
            # Closing with the daemon's hello unread makes the kernel send
            # a reset instead of an orderly end.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wait for the daemon's answer, so that there is unread data.
            await trio.lowlevel.wait_readable(sock)
            sock.close()
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")
        assert daemon.process.poll() is None


async def test_cancelling_a_stream_leaves_the_connection_in_step(
    daemon: DaemonProcess,
) -> None:
    """Found by the fuzz: a cancel that landed in the middle of a write
    closed the whole connection; the daemon now finishes the frame."""
    script = "import sys; sys.stdout.write('x' * 3_000_000); sys.stdout.flush()"
    with trio.fail_after(120):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.start([PY, "-c", script], name="big", backlog_bytes=3_000_000)
            await client.wait("big")
            for _ in range(10):
                stream = await client.stream("output", process="big")
                first = await stream.__anext__()
                assert first["offset"] == 0
                # Cancelled while the daemon writes the other frames.
                await stream.aclose()
                assert "pid" in await client.status()


async def test_bad_arguments_to_a_daemon_client_are_refused_by_name(daemon: DaemonProcess) -> None:
    with trio.fail_after(60):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            # A str is a sequence: "ls" was sent as ["l", "s"], and "lifecycle"
            # as its letters.
            with pytest.raises(TypeError, match="argv"):
                await client.start("ls")
            with pytest.raises(TypeError, match="categories"):
                await client.subscribe(categories="lifecycle")
            # What the daemon refuses as bad-params is a ValueError too, as
            # the same argument refused in-process would be.
            with pytest.raises(ValueError, match=r"bad-params.*backlog_bytes") as caught:
                await client.start([PY, "-c", "pass"], backlog_bytes=0)
            assert isinstance(caught.value, DaemonError)
            assert caught.value.code == "bad-params"
            # Other refusals are not.
            with pytest.raises(DaemonError, match="no-such-session") as refused:
                await client.signal("nobody", 15)
            assert not isinstance(refused.value, ValueError)
            # Nothing was started by any of it.
            assert all(not session["processes"] for session in await client.sessions())


async def test_autostart_that_cannot_spawn_the_daemon_leaves_no_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # connect() starts a daemon when none answers. When the spawn itself
    # failed, start_daemon closed the pipe's write end but not its read
    # end: one fd lost per attempt.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(FileNotFoundError):
            async with trio_observer.connect(tmp_path / "d" / "daemon.sock"):
                pass  # pragma: no cover
    assert set(os.listdir("/proc/self/fd")) == before
