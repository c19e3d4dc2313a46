"""Subscribers SIGKILLed at chosen points resume with exact loss, against ground truth.

Children record their own pids; each subscriber is a real process that
records every frame it takes (durably: one ``write`` per frame) and kills
itself at a chosen point: right after its request is out, right after the
reply, after N frames, or between taking frame N and recording it. The
next one resumes from what the last recorded. In the end the numbers
recorded cover 0..T once each, every event is one of a child's, and
received + missed == 2 per child (STARTED, EXITED).

CI runs the sample below (a few seconds). For a long sweep by hand, set
``TRIO_OBSERVER_SIGKILL_ROUNDS`` (say 200) to run that many random kill
points with a fixed seed.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import trio

import trio_observer
from trio_observer._daemon._client import RemoteEvent, RemoteMissed, remote_item

from .conftest import PY
from .test_daemon import DaemonProcess, daemon  # noqa: F401  (the fixture)

SUBSCRIBER = """
import os, signal, sys
import trio, trio_observer

sock, record_path, sub_id, from_seq, mode, count = sys.argv[1:]
count = int(count)
record = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

async def main():
    async with trio_observer.connect(sock, autostart=False) as client:
        if mode == "after-request":
            # Only the request goes out (the client's own framing).
            method, params = (
                ("subscribe", {"capacity": 4, "resend": 2})
                if sub_id == "-"
                else ("resume", {"subscription": sub_id, "from_seq": int(from_seq)})
            )
            await client._send({"type": "request", "id": 99, "method": method, "params": params})
            print("ready", flush=True)
            die()
        if sub_id == "-":
            stream = await client.subscribe(capacity=4, resend=2)
        else:
            stream = await client.resume(sub_id, from_seq=int(from_seq))
        os.write(record, f"ID {stream.result['id']}\\n".encode())
        print("ready", flush=True)
        if mode == "after-reply":
            die()
        taken = 0
        async for frame in stream:
            taken += 1
            if mode == "before-record" and taken == count:
                die()
            item = trio_observer.remote_item(frame)
            if isinstance(item, trio_observer.RemoteMissed):
                line = f"M {item.seq} {item.count} {item.lost_in}"
            else:
                line = f"E {item.seq} {item.event['kind']} {item.event['pid']}"
            os.write(record, (line + "\\n").encode())
            if mode == "after-frames" and taken == count:
                die()

trio.run(main)
"""

CHILD = "import os, sys; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n')"

# (mode, frame count): each kind of kill point, some twice.
SAMPLE = [
    ("after-frames", 3),
    ("after-request", 0),
    ("before-record", 2),
    ("after-reply", 0),
    ("after-frames", 1),
    ("before-record", 5),
]


def covered(line: str) -> tuple[int, int]:
    kind, seq, *rest = line.split()
    if kind == "E":
        return int(seq), int(seq) + 1
    return int(seq) - int(rest[0]), int(seq)


async def test_sigkilled_subscribers_resume_with_exact_loss(
    daemon: DaemonProcess,  # noqa: F811
    tmp_path: Path,
) -> None:
    rounds = int(os.environ.get("TRIO_OBSERVER_SIGKILL_ROUNDS", "0"))
    rng = random.Random(1)
    plan = SAMPLE + [(rng.choice([m for m, _ in SAMPLE]), rng.randint(1, 8)) for _ in range(rounds)]
    pids = tmp_path / "pids"
    sub_id = "-"
    from_seq = 0
    lines: list[str] = []
    children = 0
    with trio.fail_after(60 + 5 * rounds):
        async with trio_observer.connect(daemon.path, autostart=False) as client:
            await client.create_session("default")

            async def run_children(count: int) -> None:
                nonlocal children
                for _ in range(count):
                    children += 1
                    await client.start([PY, "-c", CHILD, str(pids)], name=f"c{children}")
                    await client.wait(f"c{children}")
                    await client.remove(f"c{children}")

            for index, (mode, count) in enumerate(plan):
                record = tmp_path / f"record{index}"
                argv = [PY, "-c", SUBSCRIBER, str(daemon.path), str(record), sub_id]
                process = await trio.lowlevel.open_process(
                    [*argv, str(from_seq), mode, str(count)], stdout=subprocess.PIPE
                )
                assert process.stdout is not None
                async with process.stdout:
                    assert (await process.stdout.receive_some()).startswith(b"ready")
                    # Events while it reads (or after it died, for the sink
                    # and the resend buffer to lose); more until it reaches
                    # its kill point (losses can merge frames).
                    await run_children(4)
                    while process.poll() is None:
                        await run_children(1)
                    await process.wait()
                assert process.returncode == -9, (mode, process.returncode)
                recorded = record.read_text().splitlines() if record.exists() else []
                if sub_id == "-":
                    # The first one dies after frames: its reply came.
                    sub_id = recorded[0].split()[1]
                for line in recorded:
                    if line.startswith("ID"):
                        continue
                    low, high = covered(line)
                    assert low == from_seq, (index, mode, line, from_seq)
                    from_seq = high
                    lines.append(line)
            # The last event (the sentinel's EXITED) flushes any loss before it.
            sentinel = await client.start([PY, "-c", "pass"], name="sentinel")
            stream = await client.resume(sub_id, from_seq=from_seq)
            while True:
                item = remote_item(await stream.__anext__())
                if isinstance(item, RemoteMissed):
                    lines.append(f"M {item.seq} {item.count} {item.lost_in}")
                else:
                    assert isinstance(item, RemoteEvent)
                    lines.append(f"E {item.seq} {item.event['kind']} {item.event['pid']}")
                low, high = covered(lines[-1])
                assert low == from_seq
                from_seq = high
                event = item.event if isinstance(item, RemoteEvent) else {}
                if (event.get("pid"), event.get("kind")) == (sentinel["pid"], "exited"):
                    break
            await stream.aclose()
    truth = {int(pid) for pid in pids.read_text().split()} | {sentinel["pid"]}
    events = [line.split() for line in lines if line.startswith("E")]
    seen = [(int(pid), kind) for _, _, kind, pid in events]
    assert len(seen) == len(set(seen)), "an event received twice"
    assert {pid for pid, _ in seen} <= truth, "an event of no child"
    missed = sum(int(line.split()[2]) for line in lines if line.startswith("M"))
    # Every event of every child is received or counted, exactly.
    assert from_seq == len(events) + missed == 2 * len(truth)
