"""Save a running VM's state into a block node, and load it back.

The patched QEMU has a ``block-node`` migration transport: ``migrate``
writes the VM state (RAM in the mapped-ram layout, then the device
state) into a block node added with ``blockdev-add`` and not attached to
the guest, and ``migrate-incoming`` in a QEMU started with ``-incoming
defer`` loads it.  ``query-vmstate-size`` says beforehand how large the
node must be.  A save is not a hand-over: the guest keeps its images and,
when the save ends however it ends, the run state it had.

Save (``save()``):

1. ``query-vmstate-size``; with a file, optionally create the image of
   exactly that size (plus the offset) and ``blockdev-add`` a node on it,
2. capabilities ``mapped-ram`` and ``events`` on, ``background-snapshot``
   on for mode ``start`` (the state as it was when the save began) or off
   for mode ``end`` (iterative precopy; the state at the switchover, where
   the guest pauses for about ``downtime-limit``), plus
   ``pause-before-switchover`` when a hook runs at the switchover,
3. ``migrate`` into the node, following ``query-migrate`` until the save
   completes or fails,
4. on every way out, Ctrl-C and SIGTERM included: ``migrate_cancel`` if
   the save still runs, wait until the guest runs again if it ran before,
   restore the capabilities and ``downtime-limit`` it had, ``blockdev-del``
   the node added for a file (retried while the migration's clean-up
   still holds it), and remove an image created for a save that failed.

Load (``load()``) is the same in a QEMU started with ``-incoming defer``:
node, ``mapped-ram``, ``migrate-incoming``, wait.  QEMU refuses a state
that is incomplete, truncated, or whose header or checksum is wrong.

qemu.qmp does the protocol; there is no QMP code of our own here.
"""

import asyncio
import dataclasses
import inspect
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from qemu.qmp import (EventListener, ExecuteError, QMPClient, QMPError,
                      Runstate)

from .interrupt import run_interruptible

TERMINAL = ('completed', 'failed', 'cancelled')
MODES = ('start', 'end')
FORMATS = ('raw', 'qcow2')
POLL_S = 0.2            # query-migrate period (MIGRATION events wake sooner)
# downtime-limit that makes a precopy switch over at its next check:
# the longest QEMU accepts (2000 s)
FORCE_DOWNTIME_MS = 2000000
NODE_DEL_S = 5.0        # how long blockdev-del retries a node still in use
QMP_TIMEOUT_S = 30.0    # longest wait for any QMP answer: a QEMU that
                        # hangs must not hang us, in the clean-up least of all


@dataclasses.dataclass
class StateResult:
    """What a save or load did, for the caller to print or check."""
    operation: str                  # 'save' or 'load'
    node: str
    offset: int = 0
    mode: Optional[str] = None      # save: 'start' or 'end'
    file: Optional[str] = None
    format: Optional[str] = None
    created: bool = False           # the image was created for this save
    size: Optional[Dict[str, int]] = None   # query-vmstate-size
    status: Optional[str] = None    # the migration's final status
    bytes_written: Optional[int] = None     # ram.transferred
    total_ms: float = 0.0           # from migrate (-incoming) to the end
    pause_ms: Optional[float] = None        # the guest's pause
    pause_source: Optional[str] = None      # 'events' or 'downtime'
    downtime_ms: Optional[int] = None       # query-migrate's downtime
    switchover_ms: Optional[float] = None   # time in the at_switchover hook
    passes: Optional[int] = None            # ram.dirty-sync-count
    forced: bool = False            # mode end: max_write forced the end
    outpaced: bool = False          # the guest dirtied faster than saved
    allocated: Optional[int] = None         # bytes the file takes on disk
    vm_status: Optional[str] = None         # query-status at the end
    error: Optional[str] = None

    @property
    def ok(self):
        return self.error is None and self.status == 'completed'

    def as_dict(self):
        return dataclasses.asdict(self) | {'ok': self.ok}


# ---------------------------------------------------------------------------
# Helpers

async def _execute(qmp: QMPClient, cmd: str, args: Optional[dict] = None):
    """qmp.execute() that gives up after QMP_TIMEOUT_S.

    A migration reports "completed" before QEMU has cleaned it up, and
    until then QEMU refuses new migration settings ("not finalized
    yet"): those are retried.
    """
    deadline = time.monotonic() + QMP_TIMEOUT_S
    while True:
        try:
            return await asyncio.wait_for(qmp.execute(cmd, args),
                                          QMP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TimeoutError(f'QEMU did not answer {cmd} within '
                               f'{QMP_TIMEOUT_S:.0f} s') from None
        except ExecuteError as err:
            if 'not finalized yet' not in str(err) or \
                    time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _error_text(err: BaseException) -> str:
    if isinstance(err, asyncio.CancelledError):
        return 'interrupted'
    return str(err) or type(err).__name__


def _channels(node: str, offset: int) -> List[dict]:
    return [{'channel-type': 'main',
             'addr': {'transport': 'block-node', 'node-name': node,
                      'offset': offset}}]


def _image_format(path: str) -> str:
    """'qcow2' or 'raw', from the image's first bytes."""
    with open(path, 'rb') as f:
        return 'qcow2' if f.read(4) == b'QFI\xfb' else 'raw'


def _node_options(node: str, path: str, fmt: str) -> dict:
    path = os.path.abspath(path)
    proto = ('host_device' if stat.S_ISBLK(os.stat(path).st_mode)
             else 'file')
    return {'driver': fmt, 'node-name': node,
            'file': {'driver': proto, 'filename': path}}


def find_qemu_img() -> str:
    """The qemu-img to create images with: $VMSNAP_QEMU_IMG, else PATH's."""
    img = os.environ.get('VMSNAP_QEMU_IMG') or shutil.which('qemu-img')
    if not img:
        raise FileNotFoundError('qemu-img not found: install it, put it on '
                                'PATH or set VMSNAP_QEMU_IMG')
    return img


def _create_image(qemu_img: str, path: str, fmt: str, size: int) -> None:
    out = subprocess.run([qemu_img, 'create', '-q', '-f', fmt, path,
                          str(size)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'qemu-img create {path} failed: '
                           f'{out.stdout.strip()}')


def _pause_from_events(events) -> Optional[float]:
    """Milliseconds between each STOP and the RESUME after it, summed."""
    total, stopped, seen = 0.0, None, False
    for ev in events:
        ts = ev['timestamp']
        t = ts['seconds'] + ts['microseconds'] / 1e6
        if ev['event'] == 'STOP' and stopped is None:
            stopped = t
        elif ev['event'] == 'RESUME' and stopped is not None:
            total += (t - stopped) * 1000
            stopped, seen = None, True
    return total if seen else None


async def _blockdev_del(qmp: QMPClient, node: str, log) -> None:
    """blockdev-del, retried while a failed migration still holds it."""
    deadline = time.monotonic() + NODE_DEL_S
    while True:
        try:
            await _execute(qmp, 'blockdev-del', {'node-name': node})
            log(f'node {node!r} removed')
            return
        except QMPError as err:
            if ('in use' not in str(err) and 'busy' not in str(err)) \
                    or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _wait_listener(listener: EventListener, timeout: float) -> None:
    """Sleep up to timeout; wake early on any event the listener gets."""
    try:
        await asyncio.wait_for(listener.get(), timeout)
    except asyncio.TimeoutError:
        pass


async def _call_hook(hook: Callable) -> None:
    """Run the hook: awaited if async, else in a thread (keeps QMP and
    the signal handlers going while it works)."""
    if inspect.iscoroutinefunction(hook):
        await hook()
    else:
        ret = await asyncio.to_thread(hook)
        if inspect.isawaitable(ret):
            await ret


class _Capabilities:
    """Set migration capabilities and downtime-limit; put them back."""

    def __init__(self, qmp: QMPClient):
        self.qmp = qmp
        self.saved_caps: Dict[str, bool] = {}
        self.saved_downtime: Optional[int] = None

    async def set(self, caps: Dict[str, bool],
                  downtime_ms: Optional[int] = None) -> None:
        current = {c['capability']: c['state'] for c in
                   await _execute(self.qmp, 'query-migrate-capabilities')}
        for name in caps:
            if name not in current:
                raise RuntimeError(f'this QEMU has no migration capability '
                                   f'{name!r}')
        changed = {n: s for n, s in caps.items() if current[n] != s}
        if changed:
            await _execute(self.qmp, 'migrate-set-capabilities', {
                'capabilities': [{'capability': n, 'state': s}
                                 for n, s in changed.items()]})
            self.saved_caps = {n: current[n] for n in changed}
        if downtime_ms is not None:
            params = await _execute(self.qmp, 'query-migrate-parameters')
            if params.get('downtime-limit') != downtime_ms:
                await _execute(self.qmp, 'migrate-set-parameters',
                               {'downtime-limit': downtime_ms})
                self.saved_downtime = params.get('downtime-limit')

    async def restore(self, log) -> None:
        try:
            if self.saved_caps:
                await _execute(self.qmp, 'migrate-set-capabilities', {
                    'capabilities': [{'capability': n, 'state': s}
                                     for n, s in self.saved_caps.items()]})
            if self.saved_downtime is not None:
                await _execute(self.qmp, 'migrate-set-parameters', {
                    'downtime-limit': self.saved_downtime})
        except QMPError as err:
            log(f'warning: could not restore the migration settings: {err}')


# ---------------------------------------------------------------------------
# Progress display

def _mib(n) -> str:
    return f'{(n or 0) / 1048576:.1f} MiB'


class Progress:
    """Prints a save's progress to a stream (stderr by default).

    On a terminal (bar=None and the stream is a TTY, or bar=True) a bar
    redrawn in place; otherwise a plain line every `every` seconds.
    prefix goes in front of each.
    Call it with each query-migrate answer, and done() at the end.
    """

    def __init__(self, stream=None, bar: Optional[bool] = None,
                 every: float = 2.0, prefix: str = ''):
        self.stream = stream or sys.stderr
        self.prefix = prefix
        self.bar = self.stream.isatty() if bar is None else bar
        self.every = every
        self.last = None
        self.drawn = False

    def __call__(self, info: dict) -> None:
        ram = info.get('ram') or {}
        total = ram.get('total') or 0
        remaining = ram.get('remaining', total)
        done = max(0, total - remaining)
        pct = 100.0 * done / total if total else 0.0
        status = info.get('status', '?')
        written = ram.get('transferred', 0)
        passes = ram.get('dirty-sync-count', 0)
        text = (f'{pct:5.1f}%  {_mib(done)} of {_mib(total)} RAM, '
                f'{_mib(written)} written, pass {passes}, '
                f'{(info.get("total-time") or 0) / 1000:.1f} s, {status}')
        if self.bar:
            width = 24
            fill = int(width * pct / 100)
            bar = '#' * fill + '.' * (width - fill)
            self.stream.write(f'\r{self.prefix}[{bar}] {text}\033[K')
            self.stream.flush()
            self.drawn = True
            return
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every \
                or status in TERMINAL:
            self.last = now
            print(f'{self.prefix}progress: {text}', file=self.stream,
                  flush=True)

    def done(self) -> None:
        if self.bar and self.drawn:
            self.stream.write('\n')
            self.stream.flush()
            self.drawn = False


# ---------------------------------------------------------------------------
# Size, save, load

async def query_size(qmp_path: str) -> Dict[str, int]:
    """query-vmstate-size of the QEMU at qmp_path."""
    qmp = QMPClient('vmsnap')
    try:
        await qmp.connect(qmp_path)
        return await _execute(qmp, 'query-vmstate-size')
    finally:
        await qmp.disconnect()


def _check_target(node, file, fmt, create):
    if (node is None) == (file is None):
        raise ValueError('give exactly one of node and file')
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'format must be one of {", ".join(FORMATS)}')
    if node is not None and (fmt is not None or create):
        raise ValueError('format and create go with file, not node')


async def save_state(qmp_path: str, node: Optional[str] = None,
                     file: Optional[str] = None, fmt: Optional[str] = None,
                     offset: int = 0, mode: str = 'end',
                     downtime_ms: int = 20, create: bool = False,
                     at_switchover: Optional[Callable] = None,
                     progress: Optional[Callable[[dict], None]] = None,
                     max_write: Optional[float] = 2.0,
                     log=print) -> StateResult:
    """Save the VM state of the QEMU at qmp_path into a block node.

    node: an existing node, or file: an image (format fmt, default raw
    with create and detected otherwise) that gets a node of its own for
    the save; create=True creates it first with exactly the size needed.
    mode 'start' saves the state as it was when the save began
    (background-snapshot), 'end' the state at the switchover, where the
    guest pauses for about downtime_ms.  at_switchover (mode 'end' only):
    called while the guest is stopped at the switchover, its disks
    flushed, e.g. to copy the disk images at the same instant; a plain
    function runs in a thread, a coroutine function is awaited.
    progress: called with every query-migrate answer.
    max_write (mode 'end'): once the save has written this many times
    the size bound, it switches over at once, however long the guest
    then pauses to write what is still dirty (None: no bound).  A guest
    that dirties memory faster than the target is written would
    otherwise make the save go on, and write, without end; this is
    logged when it happens, mode 'start' never has to converge.
    Never leaves the save running or the guest paused.
    """
    _check_target(node, file, fmt, create)
    if mode not in MODES:
        raise ValueError(f'mode must be one of {", ".join(MODES)}')
    if at_switchover is not None and mode != 'end':
        raise ValueError('at_switchover needs mode "end": a background '
                         'snapshot has no switchover')
    if offset < 0:
        raise ValueError('offset must not be negative')
    if max_write is not None and max_write <= 0:
        raise ValueError('max_write must be positive')
    if file is not None:
        file = os.path.abspath(file)
        if create and os.path.exists(file):
            raise ValueError(f'{file} exists; remove it or leave out create')
        if not create and not os.path.exists(file):
            raise ValueError(f'{file} does not exist; create it or pass '
                             'create')
        fmt = fmt or ('raw' if create else _image_format(file))
        node = f'vmsnap-state-{os.getpid()}'

    result = StateResult(operation='save', node=node, offset=offset,
                         mode=mode, file=file, format=fmt)
    qmp = QMPClient('vmsnap')
    listener = EventListener(('STOP', 'RESUME', 'MIGRATION'))
    qmp.register_listener(listener)
    caps = _Capabilities(qmp)
    node_added = False
    migrating = False
    was_running = None
    t0 = None
    try:
        await qmp.connect(qmp_path)
        was_running = (await _execute(qmp, 'query-status'))['running']
        result.size = await _execute(qmp, 'query-vmstate-size')
        log(f'vmstate size: at most {result.size["total"]} bytes '
            f'({_mib(result.size["total"])}: RAM slots '
            f'{_mib(result.size["ram"])}, device state '
            f'{_mib(result.size["device-state"])})')
        if create:
            img = find_qemu_img()
            _create_image(img, file, fmt, offset + result.size['total'])
            result.created = True
            log(f'created {file} ({fmt}, {offset + result.size["total"]} '
                'bytes)')
        if file is not None:
            await _execute(qmp, 'blockdev-add',
                           _node_options(node, file, fmt))
            node_added = True
            log(f'node {node!r} added on {file} ({fmt})')

        await caps.set({'mapped-ram': True, 'events': True,
                        'background-snapshot': mode == 'start',
                        'pause-before-switchover': at_switchover is not None},
                       downtime_ms if mode == 'end' else None)

        t0 = time.monotonic()
        migrating = True    # from here on, a cancel may be needed
        try:
            await _execute(qmp, 'migrate',
                           {'channels': _channels(node, offset)})
        except QMPError:
            migrating = False   # refused up front: nothing to cancel
            raise
        log(f'saving the {mode}-instant state into node {node!r} at offset '
            f'{offset}, guest {"running" if was_running else "paused"}')
        limit = (max_write * result.size['total']
                 if mode == 'end' and max_write else None)

        async def switch_over_now():
            # restore() puts back the downtime-limit the save began with
            if caps.saved_downtime is None:
                caps.saved_downtime = downtime_ms
            await switch_over_now()

        info = await _follow(qmp, listener, progress, at_switchover, result,
                             log, limit, switch_over_now)
        migrating = False
        _take_info(result, info)
        if result.status != 'completed':
            result.error = info.get('error-desc') or \
                f'the save ended {result.status}'
    except (Exception, asyncio.CancelledError) as err:
        result.error = _error_text(err)
        log(f'error: {result.error}')
    finally:
        if progress is not None and hasattr(progress, 'done'):
            progress.done()
        await _save_cleanup(qmp, listener, caps, result, node_added,
                            migrating, was_running, t0, log)
    return result


def _dirty_rate(info) -> Tuple[float, float]:
    """Bytes per second the guest dirties, and the save writes"""
    ram = info.get('ram', {})
    dirty = ram.get('dirty-pages-rate', 0) * ram.get('page-size', 4096)
    return dirty, ram.get('mbps', 0) * 1e6 / 8


async def _follow(qmp, listener, progress, at_switchover, result, log,
                  limit=None, switch_over_now=None):
    """Follow the migration until it ends; its last query-migrate.
    limit: bytes written after which switch_over_now() is awaited."""
    hooked = False
    while True:
        info = await _execute(qmp, 'query-migrate')
        status = info.get('status')
        _take_info(result, info)
        if progress is not None:
            progress(info)
        if status in TERMINAL:
            return info
        dirty, written = _dirty_rate(info)
        if status == 'active' and not result.outpaced and \
                (result.passes or 0) >= 3 and dirty > written > 0:
            result.outpaced = True
            log(f'the guest dirties {_mib(dirty)}/s, more than the '
                f'{_mib(written)}/s written to the target: the save cannot '
                'converge by itself' + (f'; it switches over once it has '
                                        f'written {_mib(limit)}'
                                        if limit else '') +
                ' (mode start does not have to converge)')
        if limit and not result.forced and status == 'active' and \
                (result.bytes_written or 0) >= limit:
            result.forced = True
            log(f'{_mib(result.bytes_written)} written in {result.passes} '
                f'passes, the limit is {_mib(limit)}: switching over now')
            await _execute(qmp, 'migrate-set-parameters',
                           {'downtime-limit': FORCE_DOWNTIME_MS})
        if status == 'pre-switchover' and not hooked:
            hooked = True
            if progress is not None and hasattr(progress, 'done'):
                progress.done()
            log('switchover: guest stopped, disks flushed; running the '
                'switchover hook')
            t = time.monotonic()
            try:
                await _call_hook(at_switchover)
            except Exception as err:
                raise RuntimeError(f'the switchover hook failed: '
                                   f'{err or type(err).__name__}') from err
            result.switchover_ms = (time.monotonic() - t) * 1000
            log(f'switchover hook done in {result.switchover_ms:.0f} ms')
            await _execute(qmp, 'migrate-continue',
                           {'state': 'pre-switchover'})
            continue
        await _wait_listener(listener, POLL_S)


def _take_info(result, info):
    """Status and numbers from query-migrate; a cancelled migration has
    no 'ram' any more, so the last numbers seen stay."""
    result.status = info.get('status')
    if 'ram' in info:
        result.bytes_written = info['ram'].get('transferred')
        result.passes = info['ram'].get('dirty-sync-count')
    if 'downtime' in info:
        result.downtime_ms = info['downtime']


async def _wait_running(qmp, timeout=10.0):
    """query-status once the guest runs again (or after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await _execute(qmp, 'query-status')
        if st['running'] or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.05)


async def _save_cleanup(qmp, listener, caps, result, node_added, migrating,
                        was_running, t0, log):
    cleaned = False
    if t0 is not None:
        result.total_ms = (time.monotonic() - t0) * 1000
    try:
        if qmp.runstate != Runstate.RUNNING:
            return
        if migrating:
            # Interrupted or failed while the save ran: cancel it and
            # wait until QEMU has finished with it.
            info = await _execute(qmp, 'query-migrate')
            if info.get('status') not in TERMINAL:
                log('cancelling the save (migrate_cancel)')
                await _execute(qmp, 'migrate_cancel')
                deadline = time.monotonic() + QMP_TIMEOUT_S
                while info.get('status') not in TERMINAL:
                    if time.monotonic() > deadline:
                        raise TimeoutError('the save did not end within '
                                           f'{QMP_TIMEOUT_S:.0f} s of '
                                           'migrate_cancel')
                    await _wait_listener(listener, POLL_S)
                    info = await _execute(qmp, 'query-migrate')
            _take_info(result, info)
            log(f'save {result.status}')
            if t0 is not None:
                result.total_ms = (time.monotonic() - t0) * 1000
        if was_running:
            st = await _wait_running(qmp)
            if not st['running'] and st['status'] == 'paused':
                # Not expected: QEMU resumes by itself.  Do not leave
                # the guest paused anyway.
                log('the guest stayed paused; cont')
                await _execute(qmp, 'cont')
                st = await _execute(qmp, 'query-status')
            result.vm_status = st['status']
        elif was_running is not None:
            result.vm_status = (await _execute(qmp, 'query-status'))['status']
        await asyncio.sleep(0)      # let the last RESUME be dispatched
        result.pause_ms = _pause_from_events(listener.history)
        if result.pause_ms is not None:
            result.pause_source = 'events'
        elif result.downtime_ms is not None:
            result.pause_ms = float(result.downtime_ms)
            result.pause_source = 'downtime'
        await caps.restore(log)
        if node_added:
            try:
                await _blockdev_del(qmp, result.node, log)
            except QMPError as err:
                log(f'warning: could not remove node {result.node!r}: {err}')
        cleaned = True
    except (Exception, asyncio.CancelledError) as err:  # keep cleaning up
        what = f'clean-up failed: {err or type(err).__name__}'
        log(f'error: {what}')
        result.error = f'{result.error}; {what}' if result.error else what
    finally:
        await qmp.disconnect()
        if result.file is not None and os.path.exists(result.file):
            if result.created and not result.ok and cleaned:
                os.unlink(result.file)
                log(f'removed {result.file}: the save did not complete')
            else:
                result.allocated = os.stat(result.file).st_blocks * 512


async def load_state(qmp_path: str, node: Optional[str] = None,
                     file: Optional[str] = None, fmt: Optional[str] = None,
                     offset: int = 0, log=print) -> StateResult:
    """Load a saved VM state into the QEMU at qmp_path.

    That QEMU runs with -incoming defer and the configuration of the
    saved one.  node or file (format fmt, detected by default) as for
    save_state().
    """
    _check_target(node, file, fmt, False)
    if file is not None:
        file = os.path.abspath(file)
        if not os.path.exists(file):
            raise ValueError(f'{file} does not exist')
        fmt = fmt or _image_format(file)
        node = f'vmsnap-state-{os.getpid()}'
    result = StateResult(operation='load', node=node, offset=offset,
                         file=file, format=fmt)
    qmp = QMPClient('vmsnap')
    listener = EventListener(('MIGRATION',))
    qmp.register_listener(listener)
    caps = _Capabilities(qmp)
    node_added = False
    loading = False
    t0 = None
    try:
        await qmp.connect(qmp_path)
        st = await _execute(qmp, 'query-status')
        if st['status'] != 'inmigrate':
            raise RuntimeError(f'QEMU is {st["status"]!r}, not waiting for '
                               'an incoming migration: start it with '
                               '-incoming defer')
        if file is not None:
            await _execute(qmp, 'blockdev-add',
                           _node_options(node, file, fmt))
            node_added = True
            log(f'node {node!r} added on {file} ({fmt})')
        await caps.set({'mapped-ram': True, 'events': True})
        t0 = time.monotonic()
        loading = True
        log(f'loading the state from node {node!r} at offset {offset}')
        try:
            await _execute(qmp, 'migrate-incoming',
                           {'channels': _channels(node, offset)})
        except QMPError:
            loading = False     # refused up front: nothing to cancel
            raise
        while True:
            info = await _execute(qmp, 'query-migrate')
            if info.get('status') in TERMINAL:
                break
            await _wait_listener(listener, POLL_S)
        loading = False
        result.status = info['status']
        if result.status != 'completed':
            result.error = info.get('error-desc') or \
                f'the load ended {result.status}'
    except (Exception, asyncio.CancelledError) as err:
        result.error = _error_text(err)
        if result.status is None and isinstance(err, QMPError):
            result.status = 'failed'
        log(f'error: {result.error}')
    finally:
        try:
            if qmp.runstate == Runstate.RUNNING:
                if loading:
                    try:
                        await _execute(qmp, 'migrate_cancel')
                    except QMPError as err:
                        log(f'warning: migrate_cancel: {err}')
                if t0 is not None:
                    result.total_ms = (time.monotonic() - t0) * 1000
                result.vm_status = (await _execute(qmp, 'query-status'))[
                    'status']
                if not loading:
                    await caps.restore(log)
                if node_added:
                    try:
                        await _blockdev_del(qmp, node, log)
                    except QMPError as err:
                        log(f'warning: could not remove node {node!r}: '
                            f'{err}')
        except (Exception, asyncio.CancelledError) as err:
            log(f'warning: clean-up: {err or type(err).__name__}')
        finally:
            await qmp.disconnect()
    return result


def save(*args, **kwargs) -> StateResult:
    """save_state(), interruptible by Ctrl-C and SIGTERM."""
    return run_interruptible(save_state(*args, **kwargs))


def load(*args, **kwargs) -> StateResult:
    """load_state(), interruptible by Ctrl-C and SIGTERM."""
    return run_interruptible(load_state(*args, **kwargs))


def size(qmp_path: str) -> Dict[str, int]:
    """query_size(), synchronously."""
    return asyncio.run(query_size(qmp_path))
