"""vmsnap export-delta: what changed between two internal snapshots.

A thin client of QEMU (this project's series) for incremental backups of
a qcow2 disk's internal snapshots while the guest runs on it:

 - a snapshot-access node reads the later snapshot, TO, as it was taken;
 - blockdev-snapshot-delta marks in a dirty bitmap what changed since
   the earlier one, FROM, from the image's L1/L2 tables alone (without
   FROM: all of TO that does not read as zeroes, a full backup);
 - then either QEMU's own backup job copies the marked ranges into a new
   qcow2 image on top of the previous backup (--output, push mode), or
   an NBD export offers TO with the bitmap as the "qemu:dirty-bitmap"
   metadata context, for a backup tool to read (--nbd, pull mode).

The image is never read behind QEMU's back.  Whatever happens (an error,
Ctrl-C, SIGTERM), the nodes, bitmap and export it added are removed, and
a partial output image is deleted, so that no half-written backup looks
complete.  The snapshot cannot be deleted while it is being read.
"""

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .state import _blockdev_del, _error_text, _execute, find_qemu_img

POLL_S = 0.2


@dataclass
class DeltaResult:
    node: str
    to_snapshot: str
    from_snapshot: Optional[str]
    ok: bool = False
    error: Optional[str] = None
    size: int = 0               # of the snapshot TO
    changed_bytes: int = 0      # marked in the bitmap
    granularity: int = 0
    written_bytes: int = 0      # copied by the backup job
    output: Optional[str] = None
    backing: Optional[str] = None
    nbd_uri: Optional[str] = None
    nbd_context: Optional[str] = None
    total_ms: float = 0.0
    log: List[str] = field(default_factory=list)


def _reader_size(nodes, reader):
    for n in nodes:
        if n['node-name'] == reader:
            return n['image']['virtual-size']
    raise RuntimeError(f'node {reader} vanished')


async def _create_output(qmp, qemu_img, path, size, backing, log):
    """A new qcow2 image for the delta; QEMU opens it, with its backing
    file, so that a write of part of a cluster copies the rest from the
    previous backup."""
    argv = [qemu_img, 'create', '-q', '-f', 'qcow2']
    if backing:
        argv += ['-b', os.path.abspath(backing), '-F', 'qcow2']
    argv += [path, str(size)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f'qemu-img create {path} failed: '
                           f'{out.decode().strip()}')
    log(f'created {path} ({size} bytes'
        f'{", backing " + backing if backing else ""})')


async def _run_backup(qmp, job_id, reader, target, bitmap, result, progress):
    await _execute(qmp, 'blockdev-backup', {
        'job-id': job_id, 'device': reader, 'target': target,
        'sync': 'bitmap', 'bitmap': bitmap, 'bitmap-mode': 'never',
        'auto-dismiss': False, 'auto-finalize': True})
    while True:
        jobs = [j for j in await _execute(qmp, 'query-jobs')
                if j['id'] == job_id]
        if not jobs:
            raise RuntimeError(f'job {job_id} vanished')
        job = jobs[0]
        result.written_bytes = job['current-progress']
        if job['status'] == 'concluded':
            await _execute(qmp, 'job-dismiss', {'id': job_id})
            if 'error' in job:
                raise RuntimeError(f"backup job failed: {job['error']}")
            return
        progress(job['current-progress'], job['total-progress'])
        await asyncio.sleep(POLL_S)


async def _cancel_job(qmp, job_id, log):
    try:
        await _execute(qmp, 'job-cancel', {'id': job_id})
    except ExecuteError:
        return      # never started, or already gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        jobs = [j for j in await _execute(qmp, 'query-jobs')
                if j['id'] == job_id]
        if not jobs:
            return
        if jobs[0]['status'] == 'concluded':
            await _execute(qmp, 'job-dismiss', {'id': job_id})
            log(f'cancelled job {job_id}')
            return
        await asyncio.sleep(0.05)


async def export_delta(qmp_path: str, node: str, to_snapshot: str,
                       from_snapshot: Optional[str] = None,
                       output: Optional[str] = None,
                       backing: Optional[str] = None,
                       nbd_socket: Optional[str] = None,
                       serve: Optional[Callable] = None,
                       progress: Optional[Callable[[int, int], None]] = None,
                       log: Callable[[str], None] = print) -> DeltaResult:
    """Copy what changed from @from_snapshot to @to_snapshot of qcow2 node
    @node into a new qcow2 image @output on top of @backing (push), or
    export it over NBD at @nbd_socket while the coroutine @serve runs
    (pull; by default until cancelled)."""
    result = DeltaResult(node=node, to_snapshot=to_snapshot,
                         from_snapshot=from_snapshot, output=output,
                         backing=backing)
    result.log = []

    def say(msg):
        result.log.append(msg)
        log(msg)

    if (output is None) == (nbd_socket is None):
        raise ValueError('give either an output image or an NBD socket')
    if output and from_snapshot and not backing:
        raise ValueError('a delta image needs the previous backup '
                         '(a copy of the FROM snapshot) as its backing file')
    t0 = time.monotonic()
    tag = f'vmsnap-delta-{os.getpid()}'
    reader, target, job_id, bitmap = tag, f'{tag}-out', tag, 'delta'
    added, created, exported, started_nbd = [], False, False, False
    qmp = QMPClient('vmsnap')
    try:
        await qmp.connect(qmp_path)
        await _execute(qmp, 'blockdev-add', {
            'driver': 'snapshot-access', 'node-name': reader, 'file': node,
            'snapshot': to_snapshot})
        added.append(reader)
        args = {'node': node, 'to': to_snapshot,
                'bitmap': {'node': reader, 'name': bitmap}}
        if from_snapshot:
            args['from'] = from_snapshot
        delta = await _execute(qmp, 'blockdev-snapshot-delta', args)
        result.changed_bytes = delta['changed']
        result.granularity = delta['granularity']
        result.size = _reader_size(
            await _execute(qmp, 'query-named-block-nodes', {'flat': True}),
            reader)
        say(f'{node}: {result.changed_bytes} of {result.size} bytes of '
            f"snapshot {to_snapshot} changed since "
            f"{from_snapshot or 'an empty disk'} "
            f'(granularity {result.granularity})')

        if output:
            await _create_output(qmp, find_qemu_img(), output, result.size,
                                 backing, say)
            created = True
            await _execute(qmp, 'blockdev-add', {
                'driver': 'qcow2', 'node-name': target,
                'file': {'driver': 'file',
                         'filename': os.path.abspath(output)}})
            added.append(target)
            await _run_backup(qmp, job_id, reader, target, bitmap, result,
                              progress or (lambda done, total: None))
            await _blockdev_del(qmp, target, say)
            added.remove(target)
            say(f'wrote {result.written_bytes} bytes into {output}')
        else:
            try:
                await _execute(qmp, 'nbd-server-start', {
                    'addr': {'type': 'unix',
                             'data': {'path': nbd_socket}}})
                started_nbd = True
            except ExecuteError as err:
                if 'already running' not in str(err):
                    raise
                say('using the NBD server QEMU already runs')
            await _execute(qmp, 'block-export-add', {
                'type': 'nbd', 'id': tag, 'node-name': reader,
                'name': to_snapshot, 'bitmaps': [bitmap]})
            exported = True
            result.nbd_uri = f'nbd+unix:///{to_snapshot}?socket={nbd_socket}'
            result.nbd_context = f'qemu:dirty-bitmap:{bitmap}'
            say(f'exporting {result.nbd_uri} with metadata context '
                f'{result.nbd_context}')
            try:
                if serve:
                    await serve(result)
                else:
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                say('export ended')     # what ends an export by default
        result.ok = True
    except (Exception, asyncio.CancelledError) as err:
        result.error = _error_text(err)
        say(f'failed: {result.error}')
    finally:
        if qmp.runstate.name == 'RUNNING':
            await _cleanup(qmp, job_id, tag, added, exported, started_nbd,
                           say)
        await qmp.disconnect()
        if created and not result.ok:
            os.unlink(output)
            say(f'removed the partial {output}')
        result.total_ms = (time.monotonic() - t0) * 1000
    return result


async def _cleanup(qmp, job_id, tag, added, exported, started_nbd, log):
    """Undo what export_delta() added, whatever failed"""
    steps = [lambda: _cancel_job(qmp, job_id, log)]
    if exported:
        steps.append(lambda: _execute(qmp, 'block-export-del',
                                      {'id': tag, 'mode': 'hard'}))
        steps.append(lambda: _wait_export_gone(qmp, tag))
    if started_nbd:
        steps.append(lambda: _execute(qmp, 'nbd-server-stop'))
    for node in reversed(added):
        steps.append(lambda node=node: _blockdev_del(qmp, node, log))
    for step in steps:
        try:
            await step()
        except (QMPError, RuntimeError, TimeoutError) as err:
            log(f'clean-up: {_error_text(err)}')


async def _wait_export_gone(qmp, export_id):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        exports = await _execute(qmp, 'query-block-exports')
        if not any(e['id'] == export_id for e in exports):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f'export {export_id} was not removed')


def result_json(result: DeltaResult) -> str:
    return json.dumps({k: v for k, v in result.__dict__.items()
                       if k != 'log'})
