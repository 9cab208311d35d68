"""One writer per (store at a URL, rank): a lease object `<store>/.lease.rank<r>` with holder and expiry.

Object storage has no flock, so a writer takes a lease instead (docs/feature-store.md, "The lease"):
- **taking it** writes the lease object only if there is none (S3's conditional PUT, `If-None-Match: *`);
  if there is one, it is taken over only when it has expired, or when its holder is a process of this
  machine that no longer runs (so a rerun after kill -9, or torchrun's restart of a killed rank, goes on
  at once), by a PUT conditional on the ETag read (`If-Match`): of two writers that both see it expire,
  exactly one wins. "This machine" is the host name, boot and PID namespace (a PID means nothing in
  another container with the same host name); "no longer runs" is no process with that PID, or one that
  started at another time (the PID was reused). On another machine the lease is waited out;
- **holding it**: a thread renews it every TTL / 4, again conditional on its own last ETag; a renewal that
  fails (the lease was taken over after this process stalled past its expiry) marks it lost, and the
  writer then refuses to commit another shard;
- **releasing it** deletes the object (if it is still this holder's).
Expiry is judged by the reader's clock against the holder's: clocks must agree within the TTL (NTP).
On backends without conditional writes (anything but S3-compatible ones and local folders) the same
protocol runs with a plain write and a read-back, which narrows but cannot close the race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from m3jepa.location import StoreURL, remote_errors
from m3jepa.store.lock import StoreLockedError
from m3jepa.store.manifest import StoreError

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a lease's life; renewed every LEASE_SECONDS / 4 while its writer runs


class LeaseHeldError(StoreLockedError):
    """Another live writer holds this store's lease for the same rank."""

    def __init__(self, message: str):
        StoreError.__init__(self, message)
        self.path, self.pid = None, None


class LeaseLostError(StoreError):
    """This writer's lease expired and was taken over: it must not commit anything more."""


def machine_id() -> str:
    """Where a PID means something: this host, boot and PID namespace (containers sharing a host name and
    a kernel have PID namespaces of their own; `?` where /proc cannot say, which matches only itself)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = os.readlink("/proc/self/ns/pid")  # e.g. pid:[4026531836]
    except OSError:
        pidns = "?"
    return f"{socket.gethostname()}/{boot}/{pidns}"


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), None if unknown:
    with the PID it names one process of a boot, even after the PID is reused."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat is not None else None
    except (IndexError, ValueError):
        return None


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and ")"
    except (OSError, IndexError):
        return None


@dataclass
class _Seen:
    body: dict[str, Any]
    etag: str | None


class StoreLease:
    """The lease of one rank of one store at a URL; acquire/release as StoreLock's (a context manager)."""

    def __init__(self, store: StoreURL, rank: int = 0, ttl: float = LEASE_SECONDS):
        self.url = store / f".lease.rank{rank}"
        self.store, self.rank, self.ttl = store, rank, float(ttl)
        self._nonce = uuid.uuid4().hex
        self._etag: str | None = None
        self._expires = 0.0
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ state

    @property
    def held(self) -> bool:
        return self._held

    def check(self) -> None:
        """Raise LeaseLostError when the lease is no longer this writer's (call before each commit)."""
        if not self._held:
            raise LeaseLostError(f"{self.store}: the writer holds no lease for rank {self.rank}")
        if self._lost is None and time.time() >= self._expires:
            self._lost = "it expired before it was renewed (the process stalled, or the bucket was away)"
        if self._lost is not None:
            raise LeaseLostError(
                f"{self.store}: this writer lost its lease {self.url.name} ({self._lost}); it stopped before "
                "committing more; rerun the same command to resume from the committed shards"
            )

    # ------------------------------------------------------------ acquire / renew / release

    def acquire(self) -> StoreLease:
        if self._held:
            return self
        body = self._body()
        if self._create(body):
            self._start(body)
            return self
        seen = self._read()
        if seen is None:  # released between our create and our read: try once more
            if self._create(body):
                self._start(body)
                return self
            seen = self._read()
        if seen is not None and not self._takeable(seen.body):
            raise LeaseHeldError(self._held_message(seen.body))
        if seen is None or not self._replace(body, seen):
            now = self._read()
            raise LeaseHeldError(self._held_message(now.body if now else {}))
        log.info("took over the lease %s of %s: %s", self.url, _holder(seen.body), _why_free(seen.body))
        self._start(body)
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self._held:
            return
        self._held = False
        try:
            seen = self._read()
            if seen is not None and seen.body.get("nonce") == self._nonce:
                self.url.unlink(missing_ok=True)
        except Exception as e:  # a lease that cannot be deleted expires on its own
            log.warning("could not release the lease %s (%s); it expires in %.0f s", self.url, e, self.ttl)

    def __enter__(self) -> StoreLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _start(self, body: dict[str, Any]) -> None:
        self._held, self._lost, self._expires = True, None, body["expires"]
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="m3jepa-store-lease", daemon=True)
        self._thread.start()
        log.debug("holding lease %s until %.0f", self.url, self._expires)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as e:  # the next attempt may succeed; check() fails once it has expired
                log.warning("could not renew the lease %s: %s", self.url, e)
            if self._lost is not None:
                return

    def renew(self) -> None:
        """Push the expiry on by a TTL, conditional on the lease still being this writer's."""
        with self._mutex:
            if not self._held or self._lost is not None:
                return
            body = self._body()
            if self._replace(body, _Seen({"nonce": self._nonce}, self._etag)):
                self._expires = body["expires"]
            else:
                self._lost = "another writer took it over after it expired"

    # ------------------------------------------------------------ the object

    def _body(self) -> dict[str, Any]:
        pid = os.getpid()
        holder = {"machine": machine_id(), "pid": pid, "started": process_start(pid),
                  "host": socket.gethostname()}
        return {"holder": holder, "nonce": self._nonce, "expires": time.time() + self.ttl, "ttl": self.ttl,
                "rank": self.rank}

    def _takeable(self, body: dict[str, Any]) -> bool:
        """An expired lease, a malformed one, or one whose holder is a process of this machine that no
        longer runs."""
        return _why_free(body) is not None

    def _held_message(self, body: dict[str, Any]) -> str:
        left, ttl = "", self.ttl
        with contextlib.suppress(KeyError, TypeError, ValueError):
            left = f", for {max(0.0, float(body['expires']) - time.time()):.0f} s more unless it renews it"
            ttl = float(body["ttl"])
        return (f"{self.store} is being written by {_holder(body)} (it holds the lease {self.url.name}"
                f"{left}); wait for it to finish or stop it; a lease whose writer died frees itself when it "
                f"expires (at most {ttl:.0f} s), at once for a process of this machine")

    def _read(self) -> _Seen | None:
        fs = self.url.fs
        with remote_errors(self.url):
            try:
                data = fs.cat_file(self.url.key)
                etag = _etag(fs.info(self.url.key)) if _s3(fs) else None
            except FileNotFoundError:
                return None
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        return _Seen(body if isinstance(body, dict) else {}, etag)

    def _create(self, body: dict[str, Any]) -> bool:
        """Write the lease only if there is none; True when this call created it."""
        fs, data = self.url.fs, _encode(body)
        with remote_errors(self.url):
            try:
                if _s3(fs):
                    self._etag = _etag(fs.call_s3("put_object", **_s3_key(fs, self.url), Body=data,
                                                  IfNoneMatch="*"))
                else:
                    _create_plain(fs, self.url.key, data)
            except FileExistsError:  # s3fs maps 412 Precondition Failed here
                return False
            except FileNotFoundError:
                raise StoreError(f"{self.store}: the bucket does not exist (or is not visible with these "
                                 "credentials); create it, or fix the URL") from None
            except Exception as e:
                if _precondition_failed(e):
                    return False
                raise
        return True

    def _replace(self, body: dict[str, Any], seen: _Seen) -> bool:
        """Overwrite the lease only if it is still the one `seen`; True when this call did."""
        fs, data = self.url.fs, _encode(body)
        with remote_errors(self.url):
            if _s3(fs):
                try:
                    self._etag = _etag(fs.call_s3("put_object", **_s3_key(fs, self.url), Body=data,
                                                  IfMatch=seen.etag or "*"))
                    return True
                except (FileExistsError, FileNotFoundError):
                    return False
                except Exception as e:
                    if _precondition_failed(e):
                        return False
                    raise
            # no conditional write: compare, write, read back (narrows the race, cannot close it)
            now = self._read()
            if now is None or now.body.get("nonce") != seen.body.get("nonce"):
                return False
            fs.pipe_file(self.url.key, data)
            back = self._read()
            return back is not None and back.body.get("nonce") == self._nonce


def _create_plain(fs: Any, key: str, data: bytes) -> None:
    """An exclusive create where the backend has one (fsspec's mode="create"), else check-then-write."""
    try:
        fs.pipe_file(key, data, mode="create")
    except TypeError:  # a backend whose pipe_file takes no mode
        if fs.exists(key):
            raise FileExistsError(key) from None
        fs.pipe_file(key, data)


def _encode(body: dict[str, Any]) -> bytes:
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def _holder(body: dict[str, Any]) -> str:
    holder = body.get("holder") if isinstance(body, dict) else None
    if isinstance(holder, dict):
        return f"process {holder.get('pid')} on {holder.get('host')}"
    return "another writer"


def _why_free(body: dict[str, Any]) -> str | None:
    """Why the lease `body` may be taken over, or None while its holder may still be writing."""
    try:
        late = time.time() - float(body["expires"])
        if late >= 0:
            return f"it expired {late:.0f} s ago"
        holder = body["holder"]
        if holder["machine"] != machine_id():
            return None  # another machine's process: only the expiry frees it
        pid, started = int(holder["pid"]), holder.get("started")
        if pid <= 0:
            raise ValueError(pid)  # kill(0 or -1, ...) would ask about a group of processes, not one
        if not _running(pid, None if started is None else int(started)):
            return (f"that process no longer runs on this machine (killed?), so its lease, {-late:.0f} s "
                    "from expiring, is not waited out")
        return None
    except (KeyError, TypeError, ValueError):
        return "it is not a lease this version can read"


def _running(pid: int, started: int | None) -> bool:
    """Whether process `pid` of this machine still runs: it exists, is no zombie (killed, not yet reaped
    by its parent), and, where its start time was recorded, is the process that started then."""
    stat = _proc_stat(pid)
    if stat is None:
        return _alive(pid)  # no /proc entry: gone, or a system without /proc (then the kernel says)
    if stat[0] in (b"Z", b"X"):
        return False
    try:
        return started is None or int(stat[19]) == started
    except (IndexError, ValueError):
        return True  # unreadable: assume it is the holder (the lease then expires)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _s3(fs: Any) -> bool:
    return "s3" in getattr(fs, "protocol", ()) and hasattr(fs, "call_s3")


def _s3_key(fs: Any, url: StoreURL) -> dict[str, str]:
    bucket, key, _ = fs.split_path(url.key)
    return {"Bucket": bucket, "Key": key}


def _etag(response: dict[str, Any]) -> str | None:
    return response.get("ETag") or response.get("etag")


def _precondition_failed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    # botocore's code, the HTTP status, or s3fs's translation ("At least one of the pre-conditions ...")
    markers = ("PreconditionFailed", "412", "ConditionalRequestConflict", "pre-conditions you specified")
    return any(m in text for m in markers)
