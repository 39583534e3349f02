"""Snapshot a running VM's disks with the storage underneath QEMU.

The sequence (case 3 of the original proposal):

1. optionally freeze the guest's filesystems through qemu-guest-agent,
2. ``block-drain-begin``: QEMU completes and flushes the I/O in flight on
   the nodes and holds new guest requests (the vCPUs keep running),
3. take the host snapshot (LVM, btrfs, reflink copy or any command),
4. ``block-drain-end``, then thaw the guest.

Steps 4 run on every way out of step 2 and 3: errors, Ctrl-C, SIGTERM.
Should this process die anyway, QEMU ends the drain by itself when the
QMP connection closes or the timeout expires, and qemu-ga thaws on its
own fsfreeze timeout.
"""

import asyncio
import dataclasses
import os
import shlex
import signal
import time
from typing import List, Optional, Sequence

from qemu.qmp import EventListener, QMPClient, Runstate

from .interrupt import run_interruptible


@dataclasses.dataclass
class DrainResult:
    """What happened, for the caller to print or check."""
    drain_id: str
    nodes: List[str]
    frozen_filesystems: Optional[int] = None
    begin_ms: float = 0.0          # how long block-drain-begin took
    snapshot_ms: float = 0.0       # how long the snapshot command took
    held_ms: Optional[int] = None  # from BLOCK_DRAIN_END
    end_reason: Optional[str] = None
    frozen_ms: Optional[float] = None
    error: Optional[str] = None
    drained: bool = False          # the drain took effect

    @property
    def ok(self):
        return self.error is None and self.end_reason == 'requested'


class SnapshotError(Exception):
    pass


def snapshot_command(method: str, args: Sequence[str]) -> List[str]:
    """The host command that takes the snapshot.

    lvm SOURCE_LV NAME SIZE   -> lvcreate -s -n NAME -L SIZE SOURCE_LV
    btrfs SUBVOLUME DEST      -> btrfs subvolume snapshot -r SUBVOLUME DEST
    reflink SRC DEST          -> cp --reflink=auto --sparse=always SRC DEST
    rbd POOL/IMAGE@SNAP       -> rbd snap create POOL/IMAGE@SNAP
                                 (the cluster from CEPH_CONF, or the default)
    command 'SHELL COMMAND'   -> sh -c 'SHELL COMMAND'
    """
    want = {'lvm': 3, 'btrfs': 2, 'reflink': 2, 'rbd': 1, 'command': 1}
    if method not in want:
        raise ValueError(f'unknown snapshot method {method!r}')
    if len(args) != want[method]:
        raise ValueError(f'{method} takes {want[method]} arguments, '
                         f'got {len(args)}')
    if method == 'lvm':
        lv, name, size = args
        return ['lvcreate', '--snapshot', '--name', name, '--size', size, lv]
    if method == 'btrfs':
        return ['btrfs', 'subvolume', 'snapshot', '-r', args[0], args[1]]
    if method == 'reflink':
        return ['cp', '--reflink=auto', '--sparse=always', args[0], args[1]]
    if method == 'rbd':
        if '@' not in args[0]:
            raise ValueError(f'rbd takes POOL/IMAGE@SNAP, got {args[0]!r}')
        return ['rbd', 'snap', 'create', args[0]]
    return ['sh', '-c', args[0]]


async def _connect_qga(path: str) -> QMPClient:
    # qemu-ga speaks QMP's wire format without greeting or negotiation.
    qga = QMPClient('qemu-ga')
    qga.await_greeting = False
    qga.negotiate = False
    await qga.connect(path)
    await qga.execute('guest-ping')
    return qga


async def _run(argv: List[str]) -> None:
    # In its own process group, so that an interrupted snapshot is stopped
    # with everything it started (its pipe stays open until they exit).
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise SnapshotError(f'{shlex.join(argv)} exited with '
                            f'{proc.returncode}: '
                            f'{out.decode(errors="replace").strip()}')


async def drain_snapshot(qmp_path: str, nodes: Sequence[str],
                         snapshot: List[str], timeout: int = 60,
                         qga_path: Optional[str] = None,
                         drain_id: Optional[str] = None,
                         log=print) -> DrainResult:
    """Run the whole sequence; never leaves the guest drained or frozen."""
    drain_id = drain_id or f'vmsnap-{os.getpid()}'
    result = DrainResult(drain_id=drain_id, nodes=list(nodes))
    qmp = QMPClient('vmsnap')
    qga = None
    freeze_start = None
    drain_began = False
    listener = EventListener(('BLOCK_DRAIN_END',))
    qmp.register_listener(listener)
    try:
        await qmp.connect(qmp_path)
        if qga_path:
            qga = await _connect_qga(qga_path)
            freeze_start = time.monotonic()
            result.frozen_filesystems = await qga.execute(
                'guest-fsfreeze-freeze')
            log(f'fsfreeze: {result.frozen_filesystems} guest '
                'filesystem(s) frozen')

        t0 = time.monotonic()
        drain_began = True  # it may take effect even if we are interrupted
        await qmp.execute('block-drain-begin', {
            'id': drain_id, 'nodes': list(nodes), 'timeout': timeout})
        result.begin_ms = (time.monotonic() - t0) * 1000
        result.drained = True
        log(f'drain {drain_id!r} on {", ".join(nodes)}: in-flight I/O '
            f'completed and flushed in {result.begin_ms:.0f} ms')

        t0 = time.monotonic()
        await _run(snapshot)
        result.snapshot_ms = (time.monotonic() - t0) * 1000
        log(f'snapshot: {shlex.join(snapshot)} ({result.snapshot_ms:.0f} ms)')
    except (Exception, asyncio.CancelledError) as err:
        result.error = (str(err) or type(err).__name__)
        if isinstance(err, asyncio.CancelledError):
            result.error = 'interrupted'
        log(f'error: {result.error}')
    finally:
        await _cleanup(qmp, qga, listener, result, drain_began,
                       freeze_start, log)
    return result


async def _cleanup(qmp, qga, listener, result, drain_began, freeze_start,
                   log):
    try:
        if drain_began and qmp.runstate == Runstate.RUNNING:
            active = await qmp.execute('query-block-drains')
            if any(d['id'] == result.drain_id for d in active):
                await qmp.execute('block-drain-end', {'id': result.drain_id})
                result.drained = True
            if not result.drained:
                return      # block-drain-begin failed: no drain, no event
            try:
                while True:
                    event = await asyncio.wait_for(listener.get(), 5)
                    if event['data']['id'] == result.drain_id:
                        break
                result.held_ms = event['data']['held-ms']
                result.end_reason = event['data']['reason']
                log(f'drain ended ({result.end_reason}): guest I/O to the '
                    f'nodes was held for {result.held_ms} ms')
                if result.end_reason != 'requested' and not result.error:
                    result.error = (f'the drain ended by {result.end_reason} '
                                    'before the snapshot was done; do not '
                                    'trust the snapshot')
                    log(f'error: {result.error}')
            except asyncio.TimeoutError:
                pass
    finally:
        try:
            if qga is not None:
                if freeze_start is not None:
                    await qga.execute('guest-fsfreeze-thaw')
                    result.frozen_ms = (time.monotonic() - freeze_start) * 1000
                    log(f'thawed: guest filesystems were frozen for '
                        f'{result.frozen_ms:.0f} ms')
                await qga.disconnect()
        finally:
            await qmp.disconnect()


def run(*args, **kwargs) -> DrainResult:
    """drain_snapshot() with Ctrl-C and SIGTERM turned into a clean stop."""
    return run_interruptible(drain_snapshot(*args, **kwargs))
