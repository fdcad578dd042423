"""A crash-safe work queue over a shared filesystem: file lock + JSON state + leases.

Any number of worker processes, on any number of machines, run the same command against one logdir.
All queue state lives in `logdir/queue/queue.json` and is only read and written while holding the
lock `logdir/queue/lock` (an fcntl/flock lock through the `filelock` library; the kernel drops it
when a holder dies, so a killed worker never leaves the queue locked). The state is rewritten
atomically (temp file + rename) before the lock is released — never after.

Life of a run: `pending` → `claimed` (owner token, owner process — host, boot id, pid and process
start time — and lease deadline; the worker renews the lease from a heartbeat thread while it
trains) → `done` once its run directory has been renamed into place. A claim is taken again when
its lease expired (worker killed, machine lost), or at once when its owner was a process of this
host that no longer exists (the start time tells a reused pid from the owner). A failed attempt
(exception, diverged loss) is recorded with its error; the run goes back to `pending` until it has
been tried `max_attempts` times, then it is `failed`. Every claim counts as an attempt, except a
lost claim whose run made progress (a checkpoint in `rundir.checkpoint_dir` newer than the claim):
a preempted run resumes without using up its attempts, while a run that keeps killing its worker
before its first checkpoint (out of memory) ends up `failed` instead of looping forever. A run
whose directory exists is `done` whatever the queue says: finished runs are never redone.

A worker with nothing left to claim stays while other workers hold claims, polling the queue
(every `poll_seconds`, a fraction of the lease), and takes over any claim that is lost; it exits
(status 0) when every run is done or failed. So the last worker standing finishes the campaign.
"""

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import filelock

from medleak import rundir
from medleak.errors import MedleakError
from medleak.io_utils import read_json, write_json

QUEUE_DIR = "queue"
STATE_FILE = "queue.json"
LOCK_FILE = "lock"
STATE_FORMAT = 1
PENDING, CLAIMED, DONE, FAILED = "pending", "claimed", "done", "failed"
MAX_ERRORS_KEPT = 10  # per run, so a flapping run cannot grow queue.json without bound
POLL_FRACTION = 0.1  # a waiting worker looks at the queue every tenth of a lease
MAX_POLL_SECONDS = 30.0
# Claims of this host's processes are checked at least this often: a dead owner is seen through
# /proc, not the lease, so the wait for it is the poll interval.
LOCAL_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Claim:
    """One worker's claim on one run (`token` identifies the worker process)."""

    run_index: int
    token: str
    attempt: int


@dataclass(frozen=True)
class Progress:
    total: int
    done: int
    in_progress: int
    failed: int
    pending: int

    def line(self) -> str:
        return f"run {self.done}/{self.total} done · {self.in_progress} in progress · {self.failed} failed"


def process_start_time(pid: int) -> int | None:
    """Start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), or None
    when there is no such process or no /proc (then only the pid's existence is known)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # Field 2 (the command name) is in parentheses and may hold spaces: count after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def boot_id() -> str | None:
    """This machine's boot id: two claims with the same hostname and boot id are one host's."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def this_process() -> dict:
    """The identity of this worker process, recorded in every claim it makes."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": pid, "start": process_start_time(pid)}


def process_is_gone(owner: dict | None) -> bool:
    """True when `owner` (a claim's process) was a process of this host that no longer exists.

    False when it lives, or when it cannot be told from here (another host, another boot).
    """
    if not owner or owner.get("host") != socket.gethostname() or owner.get("boot_id") != boot_id():
        return False
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    start = process_start_time(pid)
    return owner.get("start") is not None and start is not None and start != owner["start"]


def newest_checkpoint_time(logdir, run_index: int) -> float | None:
    """Newest modification time of any file in the run's checkpoint directory, or None."""
    newest = None
    for root, _, files in os.walk(rundir.checkpoint_dir(logdir, run_index)):
        for name in files:
            with contextlib.suppress(OSError):
                mtime = os.stat(os.path.join(root, name)).st_mtime
                newest = mtime if newest is None else max(newest, mtime)
    return newest


class WorkQueue:
    """The queue of one logdir. Cheap to construct; every method takes the lock itself."""

    def __init__(self, logdir, *, lease_seconds: float = 300.0, max_attempts: int = 3,
                 lock_timeout: float = 600.0, poll_seconds: float | None = None):
        if lease_seconds <= 0:
            raise MedleakError(f"--lease_seconds must be positive, got {lease_seconds}")
        if max_attempts < 1:
            raise MedleakError(f"--max_attempts must be at least 1, got {max_attempts}")
        self.logdir = Path(logdir)
        self.dir = self.logdir / QUEUE_DIR
        self.state_path = self.dir / STATE_FILE
        self.lock_path = self.dir / LOCK_FILE
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.lock_timeout = float(lock_timeout)
        # How often a worker with nothing to claim looks for lost claims to take over.
        self.poll_seconds = float(poll_seconds if poll_seconds is not None
                                  else min(MAX_POLL_SECONDS, max(0.05, POLL_FRACTION * self.lease_seconds)))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.process = this_process()
        self.held = []  # (run index, lease deadline, owner process) of others' claims at the last claim()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MedleakError(f"--logdir={self.logdir}: cannot create {self.dir} ({e.strerror or e})") from None
        # Re-entrant within a thread; each thread has its own descriptor, so the heartbeat thread
        # and the main thread exclude each other like two processes do.
        # No silent fallback to a soft (lock-file) lock where the filesystem lacks flock: a soft lock
        # left by a killed worker would block every other worker.
        self._lock = filelock.FileLock(str(self.lock_path), timeout=self.lock_timeout, fallback_to_soft=False)

    # -- locking and state -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self):
        """Holds the queue lock (re-entrant in one thread). Plan creation happens inside it."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise MedleakError(
                f"{self.lock_path}: could not take the queue lock within {self.lock_timeout:.0f} s; "
                "another process holds it (check for a hung worker)"
            ) from None
        except OSError as e:
            raise MedleakError(
                f"{self.lock_path}: cannot lock it ({e.strerror or e}); the filesystem of --logdir must support "
                "flock (Lustre: mount with -o flock; NFS: v4 or lockd running)"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _read(self) -> dict:
        if not self.state_path.is_file():
            raise MedleakError(f"{self.state_path}: queue not initialised; start workers through a dataset script")
        try:
            state = read_json(self.state_path)
        except ValueError as e:
            raise MedleakError(f"{self.state_path}: unreadable queue state ({e}); delete it to rebuild from runs/") from None
        return state

    def _write(self, state: dict) -> None:
        state["updated"] = time.time()
        write_json(self.state_path, state)

    def initialize(self, n_runs: int) -> None:
        """Creates queue.json for `n_runs` runs if absent (runs already on disk count as done)."""
        with self.locked():
            if self.state_path.is_file():
                state = self._read()
                if state["n_runs"] != n_runs:
                    raise MedleakError(
                        f"{self.state_path}: queue has {state['n_runs']} runs but --n_runs={n_runs}; "
                        "use the logdir's --n_runs or a new --logdir"
                    )
                return
            runs = [_new_run() for _ in range(n_runs)]
            state = {"format": STATE_FORMAT, "n_runs": int(n_runs), "runs": runs}
            self._sync_with_run_dirs(state)
            self._write(state)

    def _sync_with_run_dirs(self, state: dict) -> None:
        # The run directory is the ground truth for "done" (it may have been copied in by hand,
        # or renamed just before a crash that lost the state update).
        for index, run in enumerate(state["runs"]):
            if run["status"] != DONE and rundir.is_complete(self.logdir, index):
                run.update(status=DONE, owner=None, owner_process=None, lease_until=None)

    def _expire_leases(self, state: dict, now: float) -> None:
        """Frees lost claims: lease expired, or owner process of this host gone (no lease wait).

        The lost claim's attempt is given back when its run made progress (a checkpoint newer than
        the claim), so preemption never fails a run; without progress it counts.
        """
        for index, run in enumerate(state["runs"]):
            if run["status"] != CLAIMED:
                continue
            if process_is_gone(run.get("owner_process")):
                reason = "its worker process is gone (killed or crashed)"
            elif run["lease_until"] < now:
                reason = "lease expired: the worker stopped renewing (killed or lost)"
            else:
                continue
            checkpoint = newest_checkpoint_time(self.logdir, index)
            progressed = checkpoint is not None and checkpoint > run.get("claimed_at", now)
            if progressed:
                run["attempts"] = max(0, run["attempts"] - 1)
                reason += "; it saved a checkpoint, so the attempt is not counted"
            _record_error(run, run["owner"], reason, now)
            run.update(status=FAILED if run["attempts"] >= self.max_attempts else PENDING,
                       owner=None, owner_process=None, lease_until=None)

    # -- the worker's operations -------------------------------------------------------------

    def claim(self) -> Claim | None:
        """Claims the lowest-numbered claimable run, or returns None when none is left."""
        claims = self.claim_many(1)
        return claims[0] if claims else None

    def claim_many(self, k: int) -> list:
        """Claims up to `k` claimable runs, lowest-numbered first (one lock, one write); [] when none
        is left. A worker training K models per program claims K runs at a time."""
        with self.locked():
            state = self._read()
            now = time.time()
            self._sync_with_run_dirs(state)
            self._expire_leases(state, now)
            # A `failed` run becomes claimable again when a worker allows more attempts.
            chosen = [index for index, run in enumerate(state["runs"])
                      if run["status"] in (PENDING, FAILED) and run["attempts"] < self.max_attempts][:max(1, k)]
            for index in chosen:
                run = state["runs"][index]
                run.update(status=CLAIMED, owner=self.token, owner_process=self.process,
                           lease_until=now + self.lease_seconds, attempts=run["attempts"] + 1, claimed_at=now)
            self._write(state)
            self.last_progress = progress(state, now)
            self.held = [(i, r["lease_until"], r.get("owner_process")) for i, r in enumerate(state["runs"])
                         if r["status"] == CLAIMED and r["owner"] != self.token]
            return [Claim(index, self.token, state["runs"][index]["attempts"]) for index in chosen]

    def renew(self, claim: Claim) -> bool:
        """Extends the lease; False when the claim is no longer ours (expired and re-taken, or done)."""
        return self.renew_many([claim]) == [True]

    def renew_many(self, claims) -> list:
        """Extends the leases of `claims` (one lock, one write); per claim, False when no longer ours."""
        with self.locked():
            state = self._read()
            ours = []
            for claim in claims:
                run = state["runs"][claim.run_index]
                ours.append(run["status"] == CLAIMED and run["owner"] == claim.token)
                if ours[-1]:
                    run["lease_until"] = time.time() + self.lease_seconds
            if any(ours):
                self._write(state)
            return ours

    def complete(self, claim: Claim, tmp_dir) -> bool:
        """Renames the finished run into place and marks it done; False if another worker was first."""
        with self.locked():
            state = self._read()
            committed = rundir.commit_run(tmp_dir, self.logdir, claim.run_index)
            run = state["runs"][claim.run_index]
            now = time.time()
            if committed:
                run.update(finished_at=now, finished_by=claim.token)
            run.update(status=DONE, owner=None, owner_process=None, lease_until=None)
            self._sync_with_run_dirs(state)
            self._write(state)
            self.last_progress = progress(state, now)
        # The run is published: its checkpoints have served their purpose.
        shutil.rmtree(rundir.checkpoint_dir(self.logdir, claim.run_index), ignore_errors=True)
        return committed

    def fail(self, claim: Claim, error: str) -> None:
        """Records a failed attempt; the run is retried until it has had `max_attempts` claims."""
        with self.locked():
            state = self._read()
            run = state["runs"][claim.run_index]
            now = time.time()
            _record_error(run, claim.token, error, now)
            # Only the current owner moves the run on: if our lease expired and another worker
            # re-took the run, its claim stands.
            if run["status"] == CLAIMED and run["owner"] == claim.token:
                run.update(status=FAILED if run["attempts"] >= self.max_attempts else PENDING,
                           owner=None, owner_process=None, lease_until=None)
            self._write(state)
            self.last_progress = progress(state, now)

    def release(self, claim: Claim) -> None:
        """Gives a claim back without counting the attempt (the worker was interrupted, not the run)."""
        with self.locked():
            state = self._read()
            run = state["runs"][claim.run_index]
            if run["status"] == CLAIMED and run["owner"] == claim.token:
                run.update(status=PENDING, owner=None, owner_process=None, lease_until=None, attempts=max(0, run["attempts"] - 1))
                self._write(state)

    def snapshot(self) -> dict:
        """A consistent copy of the queue state (read under the lock)."""
        with self.locked():
            return self._read()

    def progress(self) -> Progress:
        with self.locked():
            state = self._read()
            self.last_progress = progress(state, time.time())
            return self.last_progress


def progress(state: dict, now: float) -> Progress:
    """Counts of a queue state; a claim whose lease has expired counts as pending, not in progress."""
    counts = {PENDING: 0, CLAIMED: 0, DONE: 0, FAILED: 0}
    for run in state["runs"]:
        status = run["status"]
        if status == CLAIMED and run["lease_until"] < now:
            status = PENDING
        counts[status] += 1
    return Progress(total=len(state["runs"]), done=counts[DONE], in_progress=counts[CLAIMED],
                    failed=counts[FAILED], pending=counts[PENDING])


def failed_runs(state: dict) -> dict:
    """{run_index: last error} of the runs that used up their attempts."""
    return {i: (run["errors"][-1]["error"] if run["errors"] else "")
            for i, run in enumerate(state["runs"]) if run["status"] == FAILED}


def _new_run() -> dict:
    return {"status": PENDING, "attempts": 0, "owner": None, "lease_until": None, "errors": []}


def _record_error(run: dict, worker: str, error: str, now: float) -> None:
    run["errors"] = (run["errors"] + [{"attempt": run["attempts"], "worker": worker, "error": str(error)[:2000],
                                        "time": now}])[-MAX_ERRORS_KEPT:]


class Heartbeat:
    """Renews the leases of a worker's claims (a list: one, or the K of a batch) from a background
    thread while they train.

    Renews every lease/3 seconds, so two renewals can be missed (a slow shared filesystem) before
    the lease expires. `lost` is set when a claim turned out to be no longer ours.
    """

    def __init__(self, queue: WorkQueue, claims, log=print):
        self.queue, self.log = queue, log
        self.claims = list(claims)
        self.interval = max(queue.lease_seconds / 3.0, 0.05)
        self.lost = False
        self._warned = set()
        self._stop = threading.Event()
        names = "+".join(str(claim.run_index) for claim in self.claims)
        self._thread = threading.Thread(target=self._beat, name=f"lease-run-{names}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _beat(self):
        while not self._stop.wait(self.interval):
            try:
                ours = self.queue.renew_many(self.claims)
            except Exception as e:  # keep beating: one slow filesystem call must not lose the lease
                self.log(f"warning: lease renewal failed ({type(e).__name__}: {e})")
                continue
            for claim, still_ours in zip(self.claims, ours):
                if not still_ours and claim.run_index not in self._warned:
                    self.log(f"warning: lost the lease on {rundir.run_dir_name(claim.run_index)} "
                             "(another worker took it); the first to finish keeps it")
                    self._warned.add(claim.run_index)
                    self.lost = True


@dataclass
class WorkSummary:
    completed: list  # run indices this worker committed
    failed_attempts: list  # (run index, error) of this worker's failed attempts
    progress: Progress
    failed_runs: dict  # run index -> last error, over the whole queue


@contextlib.contextmanager
def sigterm_as_exit():
    """Turns SIGTERM (SLURM preemption, `kill`) into SystemExit while the worker loop runs, so the
    worker gives its claim back at once instead of leaving it to expire."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failing_streak_limit(max_attempts: int) -> int:
    """Different runs failing in a row after which a worker blames its environment and stops."""
    return max(3, max_attempts + 1)


def work_loop(queue: WorkQueue, do_run, *, log=print, runs_per_claim: int = 1) -> WorkSummary:
    """Claims and runs runs until every run is done or failed (see `_work_loop`); SIGTERM gives the
    claims back."""
    with sigterm_as_exit():
        return _work_loop(queue, do_run, log=log, runs_per_claim=runs_per_claim)


def _work_loop(queue: WorkQueue, do_run, *, log=print, runs_per_claim: int = 1) -> WorkSummary:
    """Claims and runs runs until every run is done or failed.

    While other workers hold claims and nothing is claimable, the worker waits, polling the queue
    every `queue.poll_seconds`, and takes over any claim that is lost. `do_run(claim) -> tmp_dir` trains run `claim.run_index` (attempt `claim.attempt`) and writes it
    with `rundir.write_run_tmp`; the loop renames it into place. With `runs_per_claim` = K > 1 the
    worker claims up to K runs at a time (K models per device program) and calls
    `do_run(claims) -> [tmp_dir or the run's exception, per claim]`: a run that failed alone (a
    diverged loss) is recorded as that run's failed attempt while the others are published.
    Exceptions are recorded as failed
    attempts and the loop goes on — unless `failing_streak_limit(max_attempts)` different runs fail
    in a row, which points at the environment (disk full, broken device) rather than the runs: the
    worker then stops with a MedleakError instead of using up every run's attempts. A `MedleakError`
    (bad input: every run would fail the same way) and an interrupt give the claims back, without
    counting the attempt, and are re-raised.
    """
    if runs_per_claim < 1:
        raise MedleakError(f"--models_per_program must be at least 1, got {runs_per_claim}")
    completed, failed_attempts = [], []
    failing_streak = set()  # runs that failed since this worker's last success
    waiting_for = None  # the claims of other workers this worker last said it waits for
    while True:
        for stale in rundir.remove_stale_tmp_dirs(queue.logdir):
            log(f"removed {stale} left by a dead worker")
        claims = queue.claim_many(runs_per_claim)
        if not claims:
            if not queue.held:
                break
            held = tuple(index for index, _, _ in queue.held)
            if held != waiting_for:
                log(waiting_line(queue.held, queue.lease_seconds))
                waiting_for = held
            time.sleep(wait_seconds(queue))
            continue
        waiting_for = None
        for claim in claims:
            log(f"{rundir.run_dir_name(claim.run_index)}: started (attempt {claim.attempt}/{queue.max_attempts}) "
                f"by {claim.token}")
        started = time.time()
        try:
            with Heartbeat(queue, claims, log=log):
                outcomes = do_run(claims) if runs_per_claim > 1 else [do_run(claims[0])]
        except (KeyboardInterrupt, SystemExit):
            for claim in claims:
                queue.release(claim)
            log(f"{', '.join(rundir.run_dir_name(c.run_index) for c in claims)}: interrupted; gave the claim back")
            raise
        except MedleakError:
            for claim in claims:
                queue.release(claim)  # the user's input is at fault, not this run
            raise
        except Exception as e:
            outcomes = [e] * len(claims)
        for claim, outcome in zip(claims, outcomes):
            name = rundir.run_dir_name(claim.run_index)
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                committed = queue.complete(claim, outcome)
            except MedleakError:
                for unfinished in claims[claims.index(claim):]:
                    queue.release(unfinished)
                raise
            except Exception as e:
                error = f"{type(e).__name__}: {e}".splitlines()[0]
                queue.fail(claim, error)
                shutil.rmtree(rundir.tmp_run_dir(queue.logdir, claim.run_index), ignore_errors=True)
                failed_attempts.append((claim.run_index, error))
                log(f"{name}: attempt {claim.attempt} failed: {error}")
                failing_streak.add(claim.run_index)
                if len(failing_streak) >= failing_streak_limit(queue.max_attempts):
                    for unfinished in claims[claims.index(claim) + 1:]:
                        queue.release(unfinished)
                    raise MedleakError(
                        f"{len(failing_streak)} different runs failed in a row in this worker (last: {error}); "
                        "stopping so the other runs keep their attempts. Fix the cause and re-run; runs whose "
                        "attempts are used up are retried with a higher --max_attempts"
                    )
            else:
                failing_streak.clear()
                if committed:
                    completed.append(claim.run_index)
                    log(f"{name}: done in {time.time() - started:.1f} s")
                else:
                    log(f"{name}: another worker finished it first; discarded this copy")
        log(queue.last_progress.line())
    state = queue.snapshot()
    summary = WorkSummary(completed, failed_attempts, progress(state, time.time()), failed_runs(state))
    log(f"nothing left to claim · {summary.progress.line()}")
    for index, error in sorted(summary.failed_runs.items()):
        log(f"{rundir.run_dir_name(index)}: failed, attempts used up; last error: {error} "
            "(re-run with a higher --max_attempts to retry it)")
    return summary


def wait_seconds(queue: WorkQueue) -> float:
    """How long a worker with nothing to claim sleeps before it looks at the queue again."""
    this_host = socket.gethostname()
    if any((owner or {}).get("host") == this_host for _, _, owner in queue.held):
        return min(queue.poll_seconds, LOCAL_POLL_SECONDS)
    return queue.poll_seconds


def waiting_line(held, lease_seconds: float) -> str:
    """The one line a worker with nothing to claim prints: which runs it waits for, until when.

    `held`: (run index, lease deadline, owner process) of the claims other workers hold.
    """
    names = ", ".join(rundir.run_dir_name(index) for index, _, _ in held[:5])
    more = f" and {len(held) - 5} more" if len(held) > 5 else ""
    deadline = min(lease_until for _, lease_until, _ in held)
    return (f"nothing to claim; waiting for {names}{more} (trained by other workers) to finish. If one of "
            f"them dies, its run is taken over at once on this host, elsewhere when its lease expires "
            f"(the next at {time.strftime('%H:%M:%S', time.localtime(deadline))}, in "
            f"{max(0.0, deadline - time.time()):.0f} s; leases last {lease_seconds:.0f} s)")
