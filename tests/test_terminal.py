"""The local terminal: docker's detach keys, raw mode on a real pty (and its
exact restore on every way out), the window's size, and stdin read from
trio without stealing bytes or leaving the shared description non-blocking."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import string
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from corral.client.terminal import (
    DEFAULT_DETACH_KEYS,
    DetachMatcher,
    open_input,
    parse_detach_keys,
    raw_mode,
    restore,
    window_size,
)

CTRL_P, CTRL_Q, CTRL_X = b"\x10", b"\x11", b"\x18"


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    """A real pty: (master, slave); the slave is the terminal a job's user has."""
    master, slave = pty.openpty()
    yield master, slave
    for fd in (master, slave):
        with contextlib.suppress(OSError):  # a test closed it to hang the terminal up
            os.close(fd)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # a test closed it for EOF
            os.close(fd)


# parse_detach_keys


def test_the_default_detach_keys_are_dockers_ctrl_p_ctrl_q() -> None:
    assert parse_detach_keys(DEFAULT_DETACH_KEYS) == CTRL_P + CTRL_Q


def test_no_detach_keys_is_an_empty_sequence() -> None:
    assert parse_detach_keys("") == b""


@pytest.mark.parametrize(
    ("key", "code"),
    [
        *((f"ctrl-{letter}", ord(letter) - ord("a") + 1) for letter in string.ascii_lowercase),
        *((f"CTRL-{letter.upper()}", ord(letter) - ord("a") + 1) for letter in "apz"),
        ("Ctrl-p", 0x10),
        ("ctrl-@", 0x00),
        ("ctrl-[", 0x1B),
        ("ctrl-\\", 0x1C),
        ("ctrl-]", 0x1D),
        ("ctrl-^", 0x1E),
        ("ctrl-_", 0x1F),
    ],
)
def test_every_ctrl_key_is_its_control_code(key: str, code: int) -> None:
    assert parse_detach_keys(key) == bytes([code])


def test_single_printable_characters_are_themselves() -> None:
    assert parse_detach_keys("a,Z,~, ,@") == b"aZ~ @"
    assert parse_detach_keys("ctrl-a,x,ctrl-_") == b"\x01x\x1f"


@pytest.mark.parametrize(
    "text",
    ["ctrl-1", "ctrl-", "ctrl-pp", "ctl-p", "ab", "ctrl-p,", ",ctrl-q", "ctrl-p,,ctrl-q", "é",
     "\t", "\x7f", "ctrl-p, ctrl-q", "alt-p"],
)  # fmt: skip
def test_a_bad_key_is_refused_by_name_with_the_format(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid detach key '.*': use a character or ctrl-"):
        parse_detach_keys(text)


def test_the_message_names_the_bad_key_and_an_example() -> None:
    with pytest.raises(ValueError, match="invalid detach key") as caught:
        parse_detach_keys("ctrl-p,ctrl-1")
    assert str(caught.value) == (
        "invalid detach key 'ctrl-1': use a character or ctrl-<letter>,"
        " comma-separated, e.g. ctrl-p,ctrl-q"
    )


# DetachMatcher


def reference(keys: bytes, data: bytes) -> tuple[bytes, bool]:
    """What a one-shot scan of the whole input gives: the input before the
    first sequence and True, or, without one, the input less its longest end
    that begins the sequence (held) and False."""
    if keys and (found := data.find(keys)) >= 0:
        return data[:found], True
    held = max(
        (n for n in range(1, len(keys)) if n <= len(data) and data.endswith(keys[:n])), default=0
    )
    return data[: len(data) - held], False


def run_matcher(keys: bytes, pieces: list[bytes]) -> tuple[bytes, bool, bytes]:
    """Feed the pieces until a detach, as an attachment does."""
    matcher = DetachMatcher(keys)
    forwarded = b""
    for piece in pieces:
        out, detached = matcher.feed(piece)
        forwarded += out
        if detached:
            return forwarded, True, matcher.pending
    return forwarded, False, matcher.pending


# A small alphabet, so sequences, their prefixes and overlaps turn up often.
KEYS = st.binary(max_size=4).map(lambda b: bytes(c % 3 + 0x10 for c in b))
PIECES = st.lists(st.binary(max_size=6).map(lambda b: bytes(c % 4 + 0x10 for c in b)))


@given(keys=KEYS, pieces=PIECES)
def test_any_cut_of_the_input_forwards_what_a_one_shot_scan_does(
    keys: bytes, pieces: list[bytes]
) -> None:
    data = b"".join(pieces)
    forwarded, detached, pending = run_matcher(keys, pieces)
    assert (forwarded, detached) == reference(keys, data)
    if not detached:
        assert forwarded + pending == data  # nothing lost, nothing added, in order


@given(keys=KEYS, data=st.binary(max_size=30).map(lambda b: bytes(c % 4 + 0x10 for c in b)))
def test_byte_by_byte_is_the_same_as_all_at_once(keys: bytes, data: bytes) -> None:
    assert run_matcher(keys, [data[i : i + 1] for i in range(len(data))]) == run_matcher(
        keys, [data]
    )


@given(pieces=st.lists(st.binary()))
def test_without_detach_keys_everything_is_forwarded_at_once(pieces: list[bytes]) -> None:
    matcher = DetachMatcher(b"")
    for piece in pieces:
        assert matcher.feed(piece) == (piece, False)
        assert matcher.pending == b""


def test_a_held_prefix_then_another_key_forwards_the_held_bytes_first() -> None:
    matcher = DetachMatcher(CTRL_P + CTRL_Q)
    assert matcher.feed(CTRL_P) == (b"", False)
    assert matcher.pending == CTRL_P
    assert matcher.feed(b"a") == (CTRL_P + b"a", False)
    assert matcher.pending == b""


def test_the_whole_sequence_detaches_and_forwards_none_of_it() -> None:
    matcher = DetachMatcher(CTRL_P + CTRL_Q)
    assert matcher.feed(b"ls" + CTRL_P) == (b"ls", False)
    assert matcher.feed(CTRL_Q) == (b"", True)


def test_bytes_after_the_sequence_in_the_same_read_are_not_forwarded() -> None:
    matcher = DetachMatcher(CTRL_P + CTRL_Q)
    assert matcher.feed(b"ab" + CTRL_P + CTRL_Q + b"cd") == (b"ab", True)


def test_a_repeated_key_then_a_mismatch_forwards_both() -> None:
    matcher = DetachMatcher(CTRL_P + CTRL_P)
    assert matcher.feed(CTRL_P) == (b"", False)
    assert matcher.feed(CTRL_X) == (CTRL_P + CTRL_X, False)


def test_an_overlapping_start_keeps_the_bytes_that_may_still_match() -> None:
    # keys p,p,q; input p,p,p,q: the third p ends a shorter prefix, and q completes it.
    matcher = DetachMatcher(CTRL_P + CTRL_P + CTRL_Q)
    assert matcher.feed(CTRL_P) == (b"", False)
    assert matcher.feed(CTRL_P) == (b"", False)
    assert matcher.feed(CTRL_P) == (CTRL_P, False)
    assert matcher.pending == CTRL_P + CTRL_P
    assert matcher.feed(CTRL_Q) == (b"", True)


def test_a_single_detach_key_detaches_at_once() -> None:
    matcher = DetachMatcher(b"\x1d")
    assert matcher.feed(b"x\x1d") == (b"x", True)


# raw_mode


def test_raw_mode_turns_off_echo_line_editing_and_signals(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    with raw_mode(slave) as saved:
        assert saved is not None
        assert saved != termios.tcgetattr(slave)
        iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(slave)
        assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN) == 0
        assert iflag & (termios.ICRNL | termios.IXON | termios.ISTRIP) == 0
        assert oflag & termios.OPOST == 0
        assert cflag & termios.CSIZE == termios.CS8
        assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)


def test_raw_mode_restores_the_exact_attributes_after_a_normal_exit(
    terminal: tuple[int, int],
) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)
    with raw_mode(slave) as saved:
        assert termios.tcgetattr(slave) != before
    assert saved == before
    assert termios.tcgetattr(slave) == before


def test_raw_mode_keeps_attributes_it_did_not_set(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    custom = termios.tcgetattr(slave)
    custom[3] &= ~termios.ECHOCTL  # a setting of the person's, unusual on purpose
    custom[6][termios.VINTR] = b"\x07"
    termios.tcsetattr(slave, termios.TCSANOW, custom)
    before = termios.tcgetattr(slave)
    with raw_mode(slave):
        pass
    assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_raw_mode_restores_the_exact_attributes_after_an_error(
    terminal: tuple[int, int], error: type[BaseException]
) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)
    with pytest.raises(error), raw_mode(slave):
        raise error("out")
    assert termios.tcgetattr(slave) == before


async def test_raw_mode_restores_the_exact_attributes_after_a_cancellation(
    terminal: tuple[int, int],
) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)
    inside = trio.Event()
    async with trio.open_nursery() as nursery:

        async def attached() -> None:
            with raw_mode(slave):
                inside.set()
                await trio.sleep_forever()

        nursery.start_soon(attached)
        await inside.wait()
        assert termios.tcgetattr(slave) != before
        nursery.cancel_scope.cancel()
    assert termios.tcgetattr(slave) == before


def test_raw_mode_is_a_no_op_off_a_terminal(pipe: tuple[int, int]) -> None:
    read_end, _ = pipe
    with raw_mode(read_end) as saved:
        assert saved is None


def test_restoring_a_hung_up_terminal_is_not_an_error(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    with raw_mode(slave):
        os.close(master)  # the terminal emulator went away: EIO, nothing to restore


def test_restore_puts_attributes_back(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    before = termios.tcgetattr(slave)
    changed = termios.tcgetattr(slave)
    changed[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, changed)
    restore(slave, before)
    assert termios.tcgetattr(slave) == before


# window_size


def set_size(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def test_window_size_is_columns_then_rows(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    set_size(master, 132, 43)
    assert window_size(slave) == (132, 43)
    assert window_size(master) == (132, 43)


def test_a_terminal_of_size_zero_has_no_size(terminal: tuple[int, int]) -> None:
    _, slave = terminal
    set_size(slave, 0, 0)
    assert window_size(slave) is None


def test_a_pipe_or_file_has_no_window_size(pipe: tuple[int, int], tmp_path: Path) -> None:
    assert window_size(pipe[0]) is None
    with (tmp_path / "f").open("w") as file:
        assert window_size(file.fileno()) is None


# open_input


async def test_a_pipe_is_read_in_order_to_eof(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    source = open_input(read_end)
    assert not source.threaded
    os.write(write_end, b"one ")
    assert await source.receive_some() == b"one "
    os.write(write_end, b"two")
    assert await source.receive_some(2) == b"tw"
    assert await source.receive_some() == b"o"
    os.close(write_end)
    assert await source.receive_some() == b""
    await source.aclose()


async def test_a_receive_waits_for_bytes_without_blocking_trio(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    got: list[bytes] = []
    async with open_input(read_end) as source, trio.open_nursery() as nursery:

        async def reader() -> None:
            got.append(await source.receive_some())

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        os.write(write_end, b"typed")
    assert got == [b"typed"]


@pytest.mark.parametrize("blocking", [True, False])
async def test_the_shared_descriptions_blocking_flag_is_put_back(
    pipe: tuple[int, int], blocking: bool
) -> None:
    read_end, write_end = pipe
    os.set_blocking(read_end, blocking)
    source = open_input(read_end)
    assert os.get_blocking(read_end) is False  # the dup shares the description
    os.write(write_end, b"x")
    assert await source.receive_some() == b"x"
    await source.aclose()
    assert os.get_blocking(read_end) is blocking
    os.write(write_end, b"y")
    assert os.read(read_end, 10) == b"y"  # the descriptor itself is still open


async def test_bytes_after_we_stop_are_left_for_the_next_reader(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    source = open_input(read_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # a receive cancelled while it waits
    os.write(write_end, b"for the shell")
    await source.aclose()
    assert os.read(read_end, 100) == b"for the shell"


async def test_a_closed_source_refuses_to_read(pipe: tuple[int, int]) -> None:
    source = open_input(pipe[0])
    await source.aclose()
    await source.aclose()  # twice is fine
    with pytest.raises(trio.ClosedResourceError):
        await source.receive_some()


async def test_two_readers_at_once_are_refused(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    async with open_input(read_end) as source, trio.open_nursery() as nursery:
        nursery.start_soon(source.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await source.receive_some()
        os.write(write_end, b"x")


async def test_a_regular_file_is_read_in_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"a" * 100_000 + b"end")
    fd = os.open(path, os.O_RDONLY)
    try:
        async with open_input(fd) as source:
            assert source.threaded
            data = b""
            while chunk := await source.receive_some(4096):
                assert len(chunk) <= 4096
                data += chunk
            assert data == b"a" * 100_000 + b"end"
            assert await source.receive_some() == b""
        assert os.get_blocking(fd) is True
    finally:
        os.close(fd)


async def test_dev_null_which_epoll_refuses_is_read_in_a_thread() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        async with open_input(fd) as source:
            assert source.threaded
            assert await source.receive_some() == b""
    finally:
        os.close(fd)


async def test_a_raw_terminal_gives_what_was_typed_at_once(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    before = os.get_blocking(slave)
    with raw_mode(slave):
        async with open_input(slave) as source:
            assert not source.threaded
            os.write(master, b"\x03ab")  # ctrl-c is a byte like any other in raw mode
            assert await source.receive_some() == b"\x03ab"
            os.write(master, b"\r")
            assert await source.receive_some() == b"\r"
        # The master shares no description with the slave: only the slave's flag moved.
        assert os.get_blocking(slave) is before
        assert os.get_blocking(master) is True


async def test_a_terminal_that_hangs_up_ends_the_input(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    async with open_input(slave) as source:
        os.write(master, b"line\n")
        assert await source.receive_some() == b"line\n"
        os.close(master)
        assert await source.receive_some() == b""


async def test_the_master_side_reads_what_the_job_writes(terminal: tuple[int, int]) -> None:
    master, slave = terminal
    async with open_input(master) as source:
        os.write(slave, b"output")
        assert await source.receive_some() == b"output"
        os.close(slave)  # the job's side closed: a master reads EIO, which is the end
        assert await source.receive_some() == b""
