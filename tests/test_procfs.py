"""The /proc readers and net-table parsers, against real and fake /proc trees."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest

from tests._fakeproc import TCP_HEADER, FakeProc, inet_hex, tcp_line
from trio_observer._linux._nettables import (
    decode_address,
    format_address,
    parse_inet_table,
    parse_unix_table,
    read_socket_tables,
    socket_inode,
)
from trio_observer._linux._procfs import (
    has_children_files,
    parse_stat,
    read_children,
    read_cmdline,
    read_fds,
    read_proc_file,
    read_stat,
    scan_all,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def test_parse_stat_comm_with_spaces_and_parens() -> None:
    fields = ["0"] * 50
    fields[0], fields[1], fields[19], fields[49] = "Z", "42", "777", "768"
    stat = parse_stat(f"123 (a) b (c)) {' '.join(fields)}")
    assert stat.pid == 123
    assert stat.comm == "a) b (c)"
    assert stat.state == "Z"
    assert stat.ppid == 42
    assert stat.starttime == 777
    assert stat.exit_code == 768
    assert stat.is_dead
    assert not stat.main_thread_exited
    assert stat.identity == (123, 777)


def test_a_zombie_main_thread_with_other_threads_is_not_a_dead_process() -> None:
    fields = ["0"] * 50
    fields[0], fields[17], fields[19] = "Z", "2", "777"
    stat = parse_stat(f"123 (a) {' '.join(fields)}")
    assert stat.threads == 2
    assert stat.main_thread_exited
    assert not stat.is_dead


def test_parse_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a /proc"):
        parse_stat("hello")
    with pytest.raises(ValueError, match="truncated"):
        parse_stat("1 (x) S 0 0")


def test_read_stat_of_this_process_matches_os() -> None:
    stat = read_stat("/proc", os.getpid())
    assert stat is not None
    assert stat.ppid == os.getppid()
    assert not stat.is_dead
    assert read_stat("/proc", 2**22 + 7) is None  # beyond pid_max: never exists


def test_scan_all_finds_this_process() -> None:
    table = scan_all("/proc")
    assert os.getpid() in table
    assert table[os.getpid()].ppid == os.getppid()


# ------------------------------------------------------- children, cmdline


def test_read_children_with_and_without_children_files(tmp_path: Path) -> None:
    with_files = FakeProc(tmp_path / "a", children_files=True)
    with_files.add(10, 1)
    with_files.add(11, 10)
    with_files.add(12, 10)
    assert sorted(read_children(with_files.path, 10) or []) == [11, 12]
    assert read_children(with_files.path, 99) == []  # gone: no children, not "unsupported"

    assert has_children_files(with_files.path, 10) is True
    assert has_children_files(with_files.path, 99) is None  # gone: unknown

    without = FakeProc(tmp_path / "b", children_files=False)
    without.add(10, 1)
    assert read_children(without.path, 10) is None
    assert has_children_files(without.path, 10) is False


def test_this_kernel_children_files_agree_with_a_full_scan() -> None:
    supported = has_children_files("/proc", os.getpid())
    if not supported:
        pytest.skip("no /proc/<pid>/task/<tid>/children on this kernel")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=PIPE)
    try:
        mine = sorted(p for p, st in scan_all("/proc").items() if st.ppid == os.getpid())
        assert child.pid in mine
        assert sorted(read_children("/proc", os.getpid()) or []) == mine
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


def test_read_cmdline(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    fake.add(10, 1, argv=("python", "-c", "print('a b')"))
    assert read_cmdline(fake.path, 10) == ("python", "-c", "print('a b')")
    (tmp_path / "10" / "cmdline").write_bytes(b"")  # a zombie's command line is empty
    assert read_cmdline(fake.path, 10) is None
    assert read_cmdline(fake.path, 11) is None


def test_read_fds_of_this_process() -> None:
    with open(__file__, "rb") as f:
        fds = read_fds("/proc", os.getpid())
        assert fds is not None
        assert fds[f.fileno()] == os.path.realpath(__file__)
    assert read_fds("/proc", 2**22 + 7) is None


# --------------------------------------------------------------- addresses


@pytest.mark.skipif(sys.byteorder != "little", reason="the literal is little-endian")
def test_decode_address_little_endian_literals() -> None:
    assert decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert decode_address("00000000000000000000000001000000:0016") == ("::1", 22)
    # ::ffff:10.0.0.1 as the kernel prints it on x86.
    # Written as getsockname() writes it, whatever the Python version.
    assert decode_address("0000000000000000FFFF00000100000A:01BB") == ("::ffff:10.0.0.1", 443)


def test_an_ipv4_mapped_address_reads_as_getsockname_writes_it() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(("::ffff:127.0.0.1", 0))
        except OSError as exc:
            pytest.skip(f"no dual-stack loopback: {exc}")
        sock.listen()
        host, port = sock.getsockname()[:2]
        entry = read_socket_tables("/proc", os.getpid()).get(os.fstat(sock.fileno()).st_ino)
    assert entry is not None
    assert entry.local_address == f"[{host}]:{port}" == f"[::ffff:127.0.0.1]:{port}"


@pytest.mark.parametrize(
    ("host", "port"),
    [("127.0.0.1", 1), ("10.1.2.3", 65535), ("::1", 8080), ("fe80::1:2", 5353), ("::", 0)],
)
def test_decode_address_round_trip(host: str, port: int) -> None:
    assert decode_address(inet_hex(host, port)) == (host, port)


def test_decode_address_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a /proc/net address"):
        decode_address("0100007F")
    with pytest.raises(ValueError, match="not a /proc/net address"):
        decode_address("01007F:0001")


def test_format_address() -> None:
    assert format_address("127.0.0.1", 80) == "127.0.0.1:80"
    assert format_address("::1", 80) == "[::1]:80"


def test_socket_inode() -> None:
    assert socket_inode("socket:[12345]") == 12345
    assert socket_inode("pipe:[12345]") is None
    assert socket_inode("socket:[x]") is None
    assert socket_inode("/tmp/socket:[1]") is None


# -------------------------------------------------------------- net tables


def test_parse_inet_table_roles() -> None:
    text = (
        TCP_HEADER
        + tcp_line(0, inet_hex("127.0.0.1", 8080), inet_hex("0.0.0.0", 0), 0x0A, 111)
        + tcp_line(1, inet_hex("10.0.0.2", 5555), inet_hex("10.0.0.9", 443), 0x01, 222)
        + tcp_line(2, inet_hex("10.0.0.2", 5556), inet_hex("10.0.0.9", 443), 0x02, 333)
        + tcp_line(3, inet_hex("10.0.0.2", 5557), inet_hex("10.0.0.9", 443), 0x06, 0)
        + tcp_line(4, inet_hex("0.0.0.0", 0), inet_hex("0.0.0.0", 0), 0x07, 444)
    )
    table = parse_inet_table(text, "tcp")
    assert table[111].role == "listen"
    assert table[111].local_address == "127.0.0.1:8080"
    assert table[111].remote_address is None
    assert table[222].role == "connect"
    assert table[222].remote_address == "10.0.0.9:443"
    assert table[333].role == "connect"  # SYN_SENT: connect() was called
    assert 0 not in table  # TIME_WAIT remnant owned by nobody
    assert table[444].role is None  # created, never bound


def test_parse_udp_table_roles() -> None:
    text = (
        TCP_HEADER
        + tcp_line(0, inet_hex("::", 5353), inet_hex("::", 0), 0x07, 10)
        + tcp_line(1, inet_hex("::1", 40000), inet_hex("::1", 53), 0x01, 11)
    )
    table = parse_inet_table(text, "udp6")
    assert table[10].role == "listen"
    assert table[10].local_address == "[::]:5353"
    assert table[11].role == "connect"
    assert table[11].remote_address == "[::1]:53"


def test_parse_unix_table() -> None:
    text = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 100 /run/my app.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 101 /run/my app.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 102\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 103 @abstract\n"
    )
    table = parse_unix_table(text)
    assert table[100].role == "listen"
    assert table[100].local_address == "/run/my app.sock"
    assert table[101].role == "connect"
    assert table[102].role is None  # unnamed (socketpair or client end)
    assert table[103].local_address == "@abstract"


def test_read_socket_tables_sees_a_real_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        fds = read_fds("/proc", os.getpid())
        assert fds is not None
        inode = socket_inode(fds[listener.fileno()])
        assert inode is not None
        entry = read_socket_tables("/proc", os.getpid())[inode]
        assert entry.protocol == "tcp"
        assert entry.role == "listen"
        assert entry.local_address == f"127.0.0.1:{port}"


def test_a_table_longer_than_a_page_is_read_whole() -> None:
    # The kernel hands out a seq_file (a socket table, a children list)
    # about a page per read: a short read is not the end of it.
    listeners = []
    try:
        for _ in range(80):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listeners.append(listener)
        text = read_proc_file(f"/proc/{os.getpid()}/net/tcp")
        assert text is not None
        assert len(text.encode()) > 3 * 4096
        table = parse_inet_table(text, "tcp")
        assert {os.fstat(s.fileno()).st_ino for s in listeners} <= table.keys()
    finally:
        for listener in listeners:
            listener.close()
