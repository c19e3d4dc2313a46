"""The session: a nursery for processes that reaps all of them (opened by _open_session.py)."""

from __future__ import annotations

import os
import subprocess
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, final

import trio

from . import _run_process
from ._events import (
    EventCategory,
    ObserverEvent,
    ObserverEventKind,
    ResourceUsage,
    lifecycle_event,
)
from ._grace import Grace
from ._limits import Limits
from ._linux import (
    OBSERVABLE_CATEGORIES,
    CgroupContainment,
    CgroupUnavailableError,
    TreeObserver,
    group_usage,
    grow_pipe,
    prepare_limits,
    probe_cgroup,
    release_pipe,
    stop_leftovers,
    total_usage,
)
from ._output import BURST_SIZE, OutputLog, pump_stream
from ._process import (
    SESSION_ENV_VAR,
    Process,
    StdioArg,
    spawn_with_pipes,
    spawn_with_pty,
)
from ._pty import PtySize
from ._registry import ObserverRegistry
from ._sink import ObserverSubscriberId
from ._start_args import StartArguments, check_start_arguments

if TYPE_CHECKING:
    from ._capabilities import CapabilityReport

_SUM_BATCH = 64
"""How many reaped processes' usages a session keeps before summing them."""

_MIN_DRAIN_SECONDS = 1.0
"""How long, at least, the tree observer may wait on a full BLOCK sink for
the last events of a session before counting them missed."""


@final
class Session:
    """A scope that starts processes, supervises them and reaps every one.

    Obtained from :func:`open_session`; not constructed by users.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        grace_period: float,
        poll_interval: float,
        track_descendants: bool,
    ) -> None:
        self._track_descendants = track_descendants
        self._nursery = nursery
        # The parent of every process it starts (trio does not survive a
        # fork, so this cannot change under a session).
        self._pid = os.getpid()
        # Only what is needed is kept, so that a long session that starts
        # many processes does not grow: the processes still running, the
        # readers still reading, every process group (ints, for the final
        # sweep), and weak references to the reaped ones that have pipes or
        # a terminal, so that those can be closed at the end if the user
        # still holds them.
        self._running: dict[Process, None] = {}
        # Set when the last running process's supervisor has finished, for
        # the teardown that waits for it (made only then: an Event per
        # process cost a microsecond of every spawn).
        self._none_running: trio.Event | None = None
        self._reaped: weakref.WeakSet[Process] = weakref.WeakSet()
        self._groups: set[int] = set()
        self._readers: dict[trio.CancelScope, trio.Event] = {}
        self._grace_period = grace_period
        # What the teardown gives; a second Ctrl-C during it cuts it short.
        self._grace = Grace(grace_period)
        self._id = ObserverSubscriberId.new().as_str()
        self._observers = ObserverRegistry(
            category_check=_refuse_unavailable,
            on_interest_changed=lambda: self._tree.set_categories(self._tree_categories()),
        )
        self._tree = TreeObserver(
            emit=self._observers.emit,
            emit_many=self._observers.emit_many,
            emit_nowait=self._observers.emit_nowait,
            categories=self._tree_categories(),
            poll_interval=poll_interval,
            # Orphans of the tree come to this process (child subreaper):
            # recognise them by the session id, and reap them as they exit.
            adopt_marker=f"{SESSION_ENV_VAR}={self._id}".encode(),
            # With a cgroup, membership is the cgroup's: exact, marker or not.
            cgroup=lambda: None if self._containment is None else self._containment.group,
            reap_adopted=True,
        )
        # Shielded: a cancelled session still has its teardown to report
        # (the exits of the tree it stops). The observer stops when the
        # session calls finish(), with a deadline (see _finish_observing).
        self._tree_scope = trio.CancelScope(shield=True)
        # Set by the first start_process: until then there is no tree to
        # observe and nothing to tear down, so the observer's task is not
        # started and closing the session only closes its sinks.
        self._started_any = False
        # Set when the block ends: from then on the session only winds down.
        self._closing = False
        # The session's cgroup, when containment is by cgroup (set at open),
        # and what start_process(limits=...) needs to know to keep a limit.
        self._containment: CgroupContainment | None = None
        self._containment_mode = "process-group"
        self._move_self_to_leaf = False
        # What the reaped processes cost, for resources() without a cgroup:
        # their usages are kept as they come and summed into _spent in
        # batches, since summing costs a few microseconds of every reap.
        self._spent = ResourceUsage()
        self._unsummed: list[ResourceUsage] = []

    def _check_open(self) -> None:
        if self._closing:
            raise trio.ClosedResourceError(
                "this session has ended (its async with block exited); no new process can join it"
            )

    def _tree_categories(self) -> frozenset[EventCategory]:
        wanted = frozenset(c for c in OBSERVABLE_CATEGORIES if self._observers.wants(c))
        # Following the tree (PROCESS) is what lets the observer adopt and
        # reap orphans; the events themselves go nowhere without a sink.
        return wanted | {EventCategory.PROCESS} if self._track_descendants else wanted

    @property
    def _tree_wanted(self) -> bool:
        if self._track_descendants:
            return True
        wants = self._observers.wants
        return (
            wants(EventCategory.PROCESS)
            or wants(EventCategory.FILE)
            or wants(EventCategory.NETWORK)
        )

    @trio.lowlevel.enable_ki_protection
    async def _run_tree_observer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Started once per session, by its first start_process; it does
        # nothing (no scan, no socket) until a sink asks for PROCESS, FILE
        # or NETWORK. Protected from KeyboardInterrupt, as every task of
        # the session is (trio then delivers it to the main task): raised
        # in here, between run() marking itself running and its finally,
        # it left the teardown waiting in finish() for a stop never set.
        with self._tree_scope:
            await self._tree.run(task_status=task_status)

    @property
    def observers(self) -> ObserverRegistry:
        """The session's observer registry: add sinks here."""
        return self._observers

    @property
    def cancel_scope(self) -> trio.CancelScope:
        """Cancel this to stop every process tree of the session."""
        return self._nursery.cancel_scope

    @property
    def grace_period(self) -> float:
        """Seconds between SIGTERM and SIGKILL when the session stops a tree."""
        return self._grace_period

    @property
    def id(self) -> str:
        """A random id for this session; its children carry it in their
        environment as ``TRIO_OBSERVER_SESSION``."""
        return self._id

    @property
    def processes(self) -> tuple[Process, ...]:
        """The processes of this session that have not been reaped yet.

        A reaped process is dropped from the session (hold on to the
        :class:`Process` if you need it), so that a session that runs many
        commands does not accumulate them.
        """
        return tuple(self._running)

    def resources(self) -> ResourceUsage:
        """What the session's processes have cost so far.

        With cgroup containment, the session's cgroup: every process it
        ever held, descendants included. Otherwise the processes the session
        started, reaped and running, summed (CPU) or the largest (peak RSS).

        Returns:
            A :class:`ResourceUsage`; fields the kernel does not give are
            ``None``.
        """
        if self._containment is not None:
            return group_usage(self._containment.group)
        return total_usage([self._spent, *self._unsummed, *(p.resources() for p in self._running)])

    @trio.lowlevel.enable_ki_protection
    async def start_process(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        stdin: StdioArg = None,
        stdout: StdioArg = None,
        stderr: StdioArg = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pty: bool | PtySize = False,
        backlog_bytes: int = 1 << 20,
        limits: Limits | None = None,
    ) -> Process:
        """Start a process in the session and return its handle at once.

        The process gets its own process group, so that the session can stop
        it together with its descendants. Observers registered before this
        call see its ``STARTED`` event; ``EXITED`` follows, exactly once,
        when the session has reaped it.

        Args:
          argv: The program and its arguments. The program is looked up on
            ``PATH`` (the child's, if ``env`` sets one).
          stdin: ``None`` to inherit, ``subprocess.PIPE`` for a stream in
            :attr:`Process.stdin`, ``subprocess.DEVNULL``, an fd or a file.
          stdout: Likewise, with ``subprocess.PIPE`` giving
            :attr:`Process.stdout`.
          stderr: Likewise; ``subprocess.STDOUT`` merges it into stdout.
            ``CAPTURE`` (for stdout or stderr) makes the session read the
            stream into an :class:`OutputLog`, ``process.stdout_log`` or
            ``process.stderr_log``.
          cwd: The child's working directory.
          env: The child's environment (default: this process's). The
            session adds ``TRIO_OBSERVER_SESSION`` to it either way.
          pty: ``True`` (24 x 80) or a :class:`PtySize` runs the process on a
            new pseudo-terminal that is its controlling terminal, in a
            session of its own; stdin, stdout and stderr must then be left
            at ``None``. See ``process.pty``.
          backlog_bytes: How many of the newest bytes each captured stream
            (or the terminal) keeps; 1 MiB by default.
          limits: A :class:`Limits` for this process and its descendants
            (its leaf cgroup), within the session's own limits. They are
            in place before the process is moved into its leaf, so it
            never runs there unlimited. Needs cgroup containment.

        Returns:
          The :class:`Process`.

        Raises:
          TypeError: an argument has the wrong type (the message names it).
          ValueError: ``argv`` is empty, an argument, ``cwd`` or an ``env``
            entry holds a NUL byte, an ``env`` key is empty or holds ``=``,
            an fd given for a stream is not open, ``backlog_bytes`` < 1, or
            ``pty`` was combined with stdin/stdout/stderr, or ``limits`` were
            given to a session opened with ``containment="process-group"``.
            Every argument is checked before the call waits for anything, so
            nothing starts.
          RuntimeError: ``limits`` cannot be kept here: the session fell
            back to process groups, or a controller cannot be enabled (the
            message names it, says what ``cgroup.controllers`` lists and
            why). Nothing starts; the session and its other processes go on.
          FileNotFoundError: the program does not exist (no event is
            emitted; the session and its other processes go on).
          trio.ClosedResourceError: the session has ended.
        """
        spec = check_start_arguments(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            pty=pty,
            backlog_bytes=backlog_bytes,
            limits=limits,
        )
        if spec.limits is not None:
            self._prepare_limits(spec.limits)
        args = spec.argv
        # A full checkpoint (trio's rule for async functions), split the way
        # trio's own operations split it: a start that is cancelled, or a
        # KeyboardInterrupt landing here, raises before anything is spawned;
        # the schedule point comes after the spawn, where it runs while the
        # child execs instead of adding to every start. In a loop of quick
        # starts that schedule point lets the supervisors of the earlier
        # ones reap them, so zombies and pidfds do not pile up.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        if not self._started_any:
            self._started_any = True
            self._nursery.start_soon(self._run_tree_observer)
        if self._tree_wanted:
            # A sink that just asked for PROCESS/FILE/NETWORK must see this
            # process's first fork: wait for the observer to be subscribed.
            await self._tree.wait_active()
            self._check_open()
        # From here the KeyboardInterrupt of a Ctrl-C comes only at the
        # checkpoints below (this method is protected): in between, after
        # the spawn and before the try, it would have left a process that
        # nobody holds and the session waits for.
        process, started = self._launch(spec)
        try:
            try:
                if self._observers.wants(EventCategory.LIFECYCLE):
                    await self._observers.emit(
                        lifecycle_event(
                            ObserverEventKind.STARTED, process.pid, ppid=self._pid, argv=args
                        )
                    )
            finally:
                started.set()
            # After STARTED, so that no event of the process (a descendant's
            # from the tree observer) can be emitted before it.
            await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            # Cancelled (or interrupted) while STARTED waited for room, or
            # interrupted at the schedule point: the caller never gets the
            # handle, so nobody could stop or wait for the process, and the
            # block would wait for it. Its tree is stopped now, the way a
            # cancelled session stops it.
            self._abandon(process)
            raise
        return process

    def _prepare_limits(self, limits: Limits) -> None:
        # Before the spawn: a limit that cannot be kept refuses the start,
        # and writing the leaf's limits after the spawn cannot fail for
        # want of a controller. An ended session's cgroup is gone: say so.
        self._check_open()
        if self._containment is None:
            if self._containment_mode == "process-group":
                raise ValueError(
                    "limits need cgroup containment, and this session was opened with "
                    "containment='process-group'; open it with containment='cgroup' "
                    "(or 'auto' where a cgroup can be made)"
                )
            raise CgroupUnavailableError(
                "limits need cgroup containment, and this session (containment='auto') "
                f"fell back to process groups: {probe_cgroup().reason}"
            )
        prepare_limits(self._containment.group, limits, move_self_to_leaf=self._move_self_to_leaf)

    @trio.lowlevel.enable_ki_protection
    def _launch(self, spec: StartArguments) -> tuple[Process, trio.Event]:
        # Protected from KeyboardInterrupt, and without a checkpoint, from
        # the spawn until the supervisor is scheduled: a Ctrl-C landing in
        # between would leave a child nobody tracks, or a registered one
        # whose events nobody sets (the teardown would wait forever). Trio
        # delivers it at the caller's next checkpoint instead, when the
        # process is already the session's.
        args, cwd, env, backlog_bytes = spec.argv, spec.cwd, spec.env, spec.backlog_bytes
        if self._containment is not None:
            # Before the spawn: a leaf that cannot be made is an error with
            # nothing started, not a process outside its cgroup.
            self._containment.prepare()
        if spec.pty is not None:
            process, pty_stream = spawn_with_pty(
                args,
                size=spec.pty,
                cwd=cwd,
                env=env,
                session_id=self._id,
                backlog_bytes=backlog_bytes,
            )
            assert process.pty is not None
            log = process.pty.log

            async def close_terminal() -> None:
                # After the reap: closing the master earlier would hang up
                # the terminal (SIGHUP) of a process still using it.
                await process.wait()
                pty_stream.close()

            self._start_reader(pty_stream, log, then=close_terminal)
        else:
            process, out, err = spawn_with_pipes(
                args,
                stdin=spec.stdin,
                stdout=spec.stdout,
                stderr=spec.stderr,
                cwd=cwd,
                env=env,
                session_id=self._id,
                backlog_bytes=backlog_bytes,
            )
            if out is not None:
                assert process.stdout_log is not None
                self._start_reader(out, process.stdout_log, then=out.aclose, pipe_fd=out.fileno())
            if err is not None:
                assert process.stderr_log is not None
                self._start_reader(err, process.stderr_log, then=err.aclose, pipe_fd=err.fileno())
        # Before any checkpoint: the tree observer must know the root before
        # it handles the root's first fork.
        self._tree.add_root(process.pid)
        self._groups.add(process.pid)
        if self._containment is not None:
            process._leaf = self._containment.place(process.pid, spec.limits)
        started = trio.Event()
        self._running[process] = None
        self._nursery.start_soon(self._supervise, process, started)
        return process, started

    @trio.lowlevel.enable_ki_protection
    def _abandon(self, process: Process) -> None:
        # A task of its own rather than a cancel scope around every
        # supervisor (entering and leaving one cost about 3.5 us of every
        # spawn): the supervisor goes on waiting for the exit and reaps;
        # this task sends the signals, with the session's grace.
        process._abandoned = True
        self._nursery.start_soon(self._stop_abandoned, process)

    @trio.lowlevel.enable_ki_protection
    async def _stop_abandoned(self, process: Process) -> None:
        # Shielded, as a cancelled supervisor's stop is: this is that stop.
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                await process._stop_tree(self._grace, process._exited.wait)

    def _start_reader(
        self,
        stream: trio.abc.ReceiveStream,
        log: OutputLog,
        *,
        then: Callable[[], Awaitable[None]],
        pipe_fd: int | None = None,
    ) -> None:
        # Shielded: the output's tail matters most when the session is being
        # cancelled. When the session ends, _drain_readers gives the shield a
        # deadline, so a writer outside the tree cannot hang the session.
        scope = trio.CancelScope(shield=True)
        done = self._readers[scope] = trio.Event()
        # A pipe of 1 MiB (where the user's pipe memory allows) lets a fast
        # writer run on while this thread is busy, and be read in bursts.
        grown = 0 if pipe_fd is None else grow_pipe(pipe_fd)
        burst = BURST_SIZE if grown else None

        # Protected from KeyboardInterrupt: the teardown waits for done.
        @trio.lowlevel.enable_ki_protection
        async def read() -> None:
            try:
                with scope:
                    await pump_stream(stream, log, burst_size=burst)
                    await then()
            finally:
                release_pipe(grown)
                del self._readers[scope]
                done.set()

        self._nursery.start_soon(read)

    async def _drain_readers(self) -> None:
        # Everything that could write to the captured streams is gone by
        # now, so the readers reach end-of-stream on their own; a writer
        # the session could not attribute gets one grace period.
        deadline = trio.current_time() + self._grace.seconds
        for scope, done in list(self._readers.items()):
            scope.deadline = deadline
            await done.wait()

    @trio.lowlevel.enable_ki_protection
    async def run_process(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        stdin: bytes | bytearray | memoryview | StdioArg = b"",
        input: bytes | bytearray | memoryview | None = None,
        capture_stdout: bool = False,
        capture_stderr: bool = False,
        check: bool = True,
        stdout: StdioArg = None,
        stderr: StdioArg = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        task_status: trio.TaskStatus[Process] = trio.TASK_STATUS_IGNORED,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the session and wait for it, as ``trio.run_process`` does.

        Returns once the process has been reaped *and* its captured output
        has been read to the end. Under ``await nursery.start(
        session.run_process, argv)`` the :class:`Process` is handed back as
        soon as it has started. If the call is cancelled, the process's tree
        is stopped (SIGTERM to its group, SIGKILL after the session's grace
        period) before ``trio.Cancelled`` propagates.

        Args:
          argv: The program and its arguments, as for :meth:`start_process`.
          stdin: Bytes to write to the child's stdin before closing it (the
            default, ``b""``, gives it an empty stdin, as in trio), or any
            ``stdin=`` of :meth:`start_process` (``subprocess.PIPE`` only
            under ``nursery.start``).
          input: The same as bytes ``stdin=``, under :mod:`subprocess`'s name.
          capture_stdout: Collect stdout whole into the result's ``stdout``.
          capture_stderr: Collect stderr whole into the result's ``stderr``.
          check: Raise :class:`subprocess.CalledProcessError` on a non-zero
            exit. On by default, as in trio, so that a failing command is not
            missed; the exception carries the captured output.
          stdout: Where stdout goes when not captured (see
            :meth:`start_process`).
          stderr: Likewise for stderr.
          cwd: The child's working directory.
          env: The child's environment (see :meth:`start_process`).
          limits: Limits for the process's tree (see :meth:`start_process`).
          task_status: Set by ``nursery.start``.

        Returns:
          A :class:`subprocess.CompletedProcess` (``stdout``/``stderr`` are
          None unless captured).

        Raises:
          subprocess.CalledProcessError: ``check`` is true and the exit code
            is not 0.
          TypeError: ``stdin``/``input`` is a ``str``.
          ValueError: both ``stdin`` and ``input`` were given, a capture was
            combined with ``stdout=``/``stderr=``, or ``subprocess.PIPE`` was
            passed outside ``nursery.start``; see also :meth:`start_process`.
        """
        return await _run_process.run_process(
            self,
            argv,
            stdin=stdin,
            input=input,
            capture_stdout=capture_stdout,
            capture_stderr=capture_stderr,
            check=check,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            limits=limits,
            task_status=task_status,
        )

    @trio.lowlevel.enable_ki_protection
    async def _supervise(self, process: Process, started: trio.Event) -> None:
        # Protected from KeyboardInterrupt: the finally below must run, or
        # the teardown would wait for this process forever.
        try:
            cancelled = False
            try:
                await process._supervise(self._grace)
            except trio.Cancelled:
                cancelled = True
                raise
            finally:
                if process.returncode is not None:
                    self._tree.discard_root(process.pid)
                    if not process._group_has_members():
                        # An empty group's id is free for reuse by any new
                        # process: the final sweep must not take it for ours.
                        self._groups.discard(process.pid)
                if self._observers.wants(EventCategory.LIFECYCLE):
                    event = lifecycle_event(
                        ObserverEventKind.EXITED,
                        process.pid,
                        ppid=self._pid,
                        exit_code=process.returncode,
                        termination=process.termination,
                        resources=process._usage,
                    )
                    if cancelled or process._abandoned:
                        # Tearing down: a BLOCK consumer may be cancelled
                        # too, so waiting on it could hang the session.
                        self._observers.emit_nowait(event)
                    else:
                        await self._emit_exited(event, started)
        finally:
            if self._containment is not None and process.returncode is not None:
                self._containment.release(process.pid)
            del self._running[process]
            if not self._running and self._none_running is not None:
                self._none_running.set()
            if process._has_streams():
                # Only for _close(); a process without pipes or a terminal
                # has nothing to close there.
                self._reaped.add(process)
            if process._usage is not None:
                unsummed = self._unsummed
                unsummed.append(process._usage)
                if len(unsummed) >= _SUM_BATCH:
                    self._spent = total_usage([self._spent, *unsummed])
                    unsummed.clear()

    async def _emit_exited(self, event: ObserverEvent, started: trio.Event) -> None:
        # A BLOCK sink gets EXITED only after STARTED: if STARTED is still
        # waiting for room, EXITED queues behind it rather than overtaking
        # it (or being dropped) through a non-waiting send.
        try:
            # Only when STARTED is still on its way: otherwise no checkpoint,
            # so that EXITED is out before a task woken by wait() runs.
            if not started.is_set():
                await started.wait()
        except trio.Cancelled:
            # Cancelled before STARTED went out: no sink can take EXITED in
            # order any more, and the session is winding down.
            self._observers.emit_nowait(event)
            raise
        await self._observers.emit(event)

    async def _wait_for_processes(self) -> None:
        while self._running:
            self._none_running = trio.Event()
            await self._none_running.wait()

    async def _stop_leftovers(self, exit_codes: dict[int, int]) -> None:
        # Brought up to date first, so that what the sweep stops is known,
        # with its argv, and reported. Not waited for without end: an
        # observer stuck on a full BLOCK sink catches up in finish().
        with trio.move_on_after(self._drain_patience()):
            await self._tree.settle(exit_codes=exit_codes)
        if self._containment is not None:
            # First line: the cgroup's own list of members holds every
            # descendant, whatever it did to its group or environment. The
            # group/marker sweep below is the second line, for what could
            # fork out in the placement window (docs/containment.md).
            await self._containment.stop(self._grace, exit_codes)
        await stop_leftovers(
            groups=self._groups,
            known=self._tree.known_descendants(),
            marker=f"{SESSION_ENV_VAR}={self._id}".encode(),
            grace_period=self._grace,
            exit_codes=exit_codes,
        )

    async def _finish_observing(self) -> None:
        # The tree is dead: the observer reports what is left and stops,
        # before any sink closes. A BLOCK sink nobody reads must not hold
        # the session forever: past the deadline the events it could not
        # take are counted as missed.
        self._tree_scope.deadline = trio.current_time() + self._drain_patience()
        await self._tree.finish()

    @trio.lowlevel.enable_ki_protection
    async def _teardown(self, done: trio.Event) -> None:
        # A task of its own, shielded and protected from KeyboardInterrupt:
        # trio delivers Ctrl-C to the main task only, which may be the one
        # tearing the session down, and a shield does not stop it. Run in
        # the main task, the sweep would be skipped and a child escape.
        try:
            with trio.CancelScope(shield=True):
                try:
                    await self._wait_for_processes()
                    exit_codes: dict[int, int] = {}
                    await self._stop_leftovers(exit_codes)
                    await self._drain_readers()
                    await self._finish_observing()
                finally:
                    # Before the sinks close: nothing may emit into them after.
                    self._close()
        finally:
            done.set()

    @trio.lowlevel.enable_ki_protection
    async def _wait_for_teardown(self, done: trio.Event) -> None:
        # A Ctrl-C while the teardown runs does not skip the sweep: it ends
        # the grace period (SIGKILL now, to everything still running and to
        # every leftover), so however often the user presses it, the
        # session ends within one SIGKILL round; then it is re-raised.
        interrupted = False
        with trio.CancelScope(shield=True):
            while not done.is_set():
                try:
                    await done.wait()
                except KeyboardInterrupt:
                    interrupted = True
                    self._hurry_teardown()
        if interrupted:
            raise KeyboardInterrupt

    def _hurry_teardown(self) -> None:
        # What a second Ctrl-C does during the teardown (the CLI's second
        # SIGTERM too): SIGKILL now to what still runs, no grace after.
        self._grace.hurry()

    def _drain_patience(self) -> float:
        return max(self._grace.seconds, _MIN_DRAIN_SECONDS)

    def _close(self) -> None:
        self._tree_scope.cancel()
        self._observers.close()
        for process in (*self._running, *self._reaped):
            process._close_streams()


_capabilities: CapabilityReport | None = None


def _refuse_unavailable(categories: frozenset[EventCategory]) -> None:
    # Probing opens a netlink socket, so it is done once per process.
    global _capabilities
    if categories <= {EventCategory.LIFECYCLE}:
        return
    if _capabilities is None:
        # Imported here: a session that wants only LIFECYCLE never needs it.
        from ._capabilities import negotiate_capabilities

        _capabilities = negotiate_capabilities()
    for category in categories:
        _capabilities.require(category)
