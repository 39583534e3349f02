"""vmsnap group create | list | load | delete: disks and the VM state at
one instant.

A thin client of QEMU's snapshot-group job (this project's series): it
optionally adds a raw image as the VM state's node, starts the group,
follows its progress, and when the group drained disks, runs the storage
command (an LVM, btrfs, Ceph or reflink snapshot of what lies under them)
while the drain holds, then ends the drain whatever happened.  An
interrupt cancels the group; QEMU then leaves no internal snapshot,
drain or loadable state of it behind, and the guest keeps running.

list, load and delete work on what QEMU records of a group: the internal
snapshots named by its tag, one of them with the VM state when the state
went into an internal snapshot (a live savevm), and the record a group
writes into the header of its VM state in a block node.  They use QEMU's
snapshot-load, snapshot-group-load, snapshot-delete and block-commit
jobs and discard-vmstate-node.  A group with its VM state in a block
node loads in place when all its disks are internal, and otherwise into
a fresh QEMU started with -incoming defer (migrate-incoming), its
internal disks reverted first with qemu-img.
"""

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from qemu.qmp import EventListener, ExecuteError, QMPClient

from .interrupt import run_interruptible
from .state import (_blockdev_del, _create_image, _error_text, _execute,
                    _node_options, _pause_from_events, find_qemu_img)

POLL_S = 0.1
ACTIONS = ('internal', 'external', 'drain')
# QEMU's name for a group's internal snapshots until the group completes
UNFINISHED = '.incomplete'


@dataclass
class GroupResult:
    tag: str
    instant: str
    disks: List[dict]
    state_file: Optional[str] = None
    ok: bool = False
    error: Optional[str] = None
    pause_ms: Optional[float] = None
    state_bytes: int = 0
    storage_command: Optional[str] = None
    drain_held_ms: Optional[int] = None
    total_ms: float = 0.0
    log: List[str] = field(default_factory=list)


def parse_disk(spec: str) -> dict:
    """node=internal, node=drain or node=external:overlay"""
    node, sep, action = spec.partition('=')
    action, _, overlay = action.partition(':')
    if not sep or not node or action not in ACTIONS or \
            bool(overlay) != (action == 'external'):
        raise ValueError(f'bad disk {spec!r}: expected node=internal, '
                         'node=drain or node=external:OVERLAY-NODE')
    disk = {'node-name': node, 'action': action}
    if overlay:
        disk['overlay'] = overlay
    return disk


async def create_group(qmp_path: str, tag: str, disks: List[dict],
                       state_file: Optional[str] = None,
                       state_node: Optional[str] = None,
                       state_internal: Optional[str] = None,
                       instant: str = 'start', drain_timeout: int = 60,
                       storage_command: Optional[str] = None,
                       log: Callable[[str], None] = print) -> GroupResult:
    """Take @disks and, with @state_file (a raw image created at the
    size QEMU asks for), @state_node or @state_internal (one of the
    internal disks, whose snapshot then holds it), the VM state, at one
    instant."""
    result = GroupResult(tag=tag, instant=instant, disks=disks,
                         state_file=state_file,
                         storage_command=storage_command)
    job_id = f'vmsnap-{os.getpid()}'
    node = state_node
    qmp = QMPClient('vmsnap')
    listener = EventListener(('STOP', 'RESUME', 'BLOCK_DRAIN_END',
                              'SNAPSHOT_GROUP_COMPLETED'))
    qmp.register_listener(listener)
    node_added = job_started = False
    drains = any(d['action'] == 'drain' for d in disks)
    t0 = time.monotonic()
    try:
        await qmp.connect(qmp_path)
        if state_file:
            size = (await _execute(qmp, 'query-vmstate-size'))['total']
            _create_image(find_qemu_img(), state_file, 'raw', size)
            node = f'vmsnap-state-{os.getpid()}'
            await _execute(qmp, 'blockdev-add',
                           _node_options(node, state_file, 'raw'))
            node_added = True
            log(f'state: {state_file} ({size} bytes) as node {node!r}')
        args = {'job-id': job_id, 'tag': tag, 'disks': disks,
                'instant': instant, 'drain-timeout': drain_timeout}
        if node:
            args['vmstate'] = {'target': 'block-node', 'node-name': node}
        elif state_internal:
            args['vmstate'] = {'target': 'internal',
                               'node-name': state_internal}
        await _execute(qmp, 'snapshot-group', args)
        job_started = True
        log(f'group {tag!r} started at the {instant} instant')
        async def drained():
            # The instant has passed: snapshot the storage now, not once
            # the whole state is written, and let the guest's I/O go
            if storage_command:
                log(f'storage snapshot: {storage_command}')
                out = await asyncio.to_thread(
                    subprocess.run, ['sh', '-c', storage_command],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(
                        f'the storage command failed ({out.returncode}): '
                        f'{out.stdout.strip()}')
            await _end_drain(qmp, tag, listener, result, log)

        job = await _follow(qmp, job_id, log, tag if drains else None,
                            drained)
        job_started = False
        if 'error' in job:
            raise RuntimeError(job['error'])
        # What the group says it wrote (the progress counts the captured
        # device state twice at the start instant)
        done = [ev['data'] for ev in listener.history
                if ev['event'] == 'SNAPSHOT_GROUP_COMPLETED' and
                ev['data']['job-id'] == job_id]
        result.state_bytes = done[-1]['vmstate-size'] if done else 0
        result.pause_ms = _pause_from_events(listener.history)
        log(f'group {tag!r} taken; guest paused '
            f'{result.pause_ms or 0:.1f} ms')
        if drains and result.drain_held_ms is None:
            await drained()
        result.ok = True
    except (Exception, asyncio.CancelledError) as err:
        # pylint: disable=broad-except
        result.error = _error_text(err)
        log(f'FAILED: {result.error}')
    finally:
        if job_started:
            await _cancel(qmp, job_id, log)
        if drains and qmp.runstate.name == 'RUNNING':
            await _end_drain(qmp, tag, listener, result, log)
        if node_added:
            await _blockdev_del(qmp, node, log)
        if not result.ok and state_file and os.path.exists(state_file):
            os.unlink(state_file)
        result.total_ms = (time.monotonic() - t0) * 1000
        await qmp.disconnect()
    return result


async def _follow(qmp, job_id, log, drain_id=None, drained=None):
    """Wait for the job to conclude, logging its progress; dismiss it.
    Once drain @drain_id is active, await drained()."""
    last = -1
    while True:
        if drain_id and any(d['id'] == drain_id for d in
                            await _execute(qmp, 'query-block-drains')):
            drain_id = None
            await drained()
        job = next((j for j in await _execute(qmp, 'query-jobs')
                    if j['id'] == job_id), None)
        if job is None:
            raise RuntimeError(f'job {job_id} is gone')
        total = job.get('total-progress') or 0
        if total and job['current-progress'] * 10 // total != last:
            last = job['current-progress'] * 10 // total
            log(f'  {job["status"]}: {job["current-progress"]} of '
                f'{total} bytes')
        if job['status'] == 'concluded':
            await _execute(qmp, 'job-dismiss', {'id': job_id})
            return job
        await asyncio.sleep(POLL_S)


async def _cancel(qmp, job_id, log):
    log('cancelling the group')
    try:
        await _execute(qmp, 'job-cancel', {'id': job_id})
    except Exception:               # pylint: disable=broad-except
        pass
    await asyncio.shield(_follow(qmp, job_id, log))


async def _end_drain(qmp, tag, listener, result, log):
    """End the group's drain if it is still active; how long it held."""
    drains = await _execute(qmp, 'query-block-drains')
    if not any(d['id'] == tag for d in drains):
        return
    await _execute(qmp, 'block-drain-end', {'id': tag})
    deadline = time.monotonic() + 5
    while result.drain_held_ms is None and time.monotonic() < deadline:
        for ev in listener.history:
            if ev['event'] == 'BLOCK_DRAIN_END' and ev['data']['id'] == tag:
                result.drain_held_ms = ev['data']['held-ms']
        await asyncio.sleep(0.02)
    log(f'drain {tag!r} ended after {result.drain_held_ms} ms')


def create(*args, **kwargs) -> GroupResult:
    """create_group(), interruptible by Ctrl-C and SIGTERM."""
    return run_interruptible(create_group(*args, **kwargs))


@dataclass
class GroupInfo:
    tag: str
    disks: List[str]                # nodes with an internal snapshot 'tag'
    state_node: Optional[str]       # the one whose snapshot has the state
    state_bytes: int
    date: int                       # seconds since the epoch
    vm_clock_ns: int
    # What the group recorded in the header of its VM state in a block
    # node (query-vmstate-node), when one was given to look at:
    state_file: Optional[str] = None
    instant: Optional[str] = None
    recorded_disks: List[dict] = field(default_factory=list)
    complete: Optional[bool] = None     # False: the save did not finish
    missing: List[str] = field(default_factory=list)
    # Disks whose snapshot is still named tag + UNFINISHED: QEMU did not
    # finish the group
    unfinished: List[str] = field(default_factory=list)
    # After load: how, the disks reverted first, the guest's run state
    loaded: Optional[str] = None
    reverted: List[str] = field(default_factory=list)
    vm_status: Optional[str] = None


async def _recorded(qmp, groups, state_nodes, state_files):
    """Add what the VM states in @state_nodes and @state_files say of
    their groups (the files are opened read-only for the look)."""
    looks = [(node, None) for node in state_nodes]
    looks += [(f'vmsnap-look-{os.getpid()}-{i}', path)
              for i, path in enumerate(state_files)]
    for node, path in looks:
        if path:
            await _execute(qmp, 'blockdev-add', dict(
                _node_options(node, path, 'raw'), **{'read-only': True}))
        try:
            info = await _execute(qmp, 'query-vmstate-node',
                                  {'node-name': node})
        except ExecuteError as err:
            # A state deleted, or never written: no group there
            if 'holds no VM state' not in str(err):
                raise
            continue
        finally:
            if path:
                await _blockdev_del(qmp, node, lambda msg: None)
        rec = info.get('group')
        if not rec:
            continue
        g = groups.setdefault(rec['tag'], GroupInfo(
            tag=rec['tag'], disks=[], state_node=None, state_bytes=0,
            date=rec['date-sec'], vm_clock_ns=0))
        g.state_node = None if path else node
        g.state_file = path
        g.state_bytes = info['size']
        g.instant = rec['instant']
        g.recorded_disks = rec['disks']
        g.complete = info['status'] == 'complete' and not g.unfinished
        # An internal snapshot the group took that no disk has now
        g.missing = [d['node-name'] for d in rec['disks']
                     if d['action'] == 'internal' and
                     d['node-name'] not in g.disks + g.unfinished]


async def _groups(qmp, state_nodes=(), state_files=()) -> List[GroupInfo]:
    """The groups QEMU records: internal snapshots by name, on the
    writable top nodes (the disks as the guest sees them), and what the
    given VM states in block nodes record of their groups."""
    groups = {}
    for n in await _execute(qmp, 'query-named-block-nodes',
                            {'flat': True}):
        if n.get('ro') or n['drv'] != 'qcow2':
            continue
        for sn in n['image'].get('snapshots', []):
            tag = sn['name']
            unfinished = tag.endswith(UNFINISHED)
            if unfinished:
                tag = tag[:-len(UNFINISHED)]
            g = groups.setdefault(tag, GroupInfo(
                tag=tag, disks=[], state_node=None, state_bytes=0,
                date=sn['date-sec'], vm_clock_ns=sn['vm-clock-sec'] *
                10**9 + sn['vm-clock-nsec']))
            if unfinished:
                g.unfinished.append(n['node-name'])
                g.complete = False
            else:
                g.disks.append(n['node-name'])
            if sn['vm-state-size']:
                g.state_node = n['node-name']
                g.state_bytes = sn['vm-state-size']
    await _recorded(qmp, groups, state_nodes, state_files)
    return sorted(groups.values(), key=lambda g: (g.date, g.tag))


async def list_groups(qmp_path: str, state_nodes=(),
                      state_files=()) -> List[GroupInfo]:
    qmp = QMPClient('vmsnap')
    await qmp.connect(qmp_path)
    try:
        return await _groups(qmp, state_nodes, state_files)
    finally:
        await qmp.disconnect()


async def _find(qmp, tag, state_nodes=(), state_files=()) -> GroupInfo:
    group = next((g for g in await _groups(qmp, state_nodes, state_files)
                  if g.tag == tag), None)
    if group is None:
        raise RuntimeError(f'no group {tag!r}: no disk has an internal '
                           f'snapshot of that name, and no VM state given '
                           f'records it')
    return group


async def _run_job(qmp, job_id, command, args):
    await _execute(qmp, command, dict(args, **{'job-id': job_id}))
    job = await _follow(qmp, job_id, lambda msg: None)
    if 'error' in job:
        raise RuntimeError(job['error'])


async def load_group(qmp_path: str, tag: str, state_nodes=(),
                     state_files=(),
                     log: Callable[[str], None] = print) -> GroupInfo:
    """Take the guest back to group @tag.

    In a running QEMU, in place, with snapshot-load: the group's disks
    are internal snapshots and its VM state is in one of them, or, with
    snapshot-group-load, in a block node.

    In a QEMU started with -incoming defer on the group's images, from
    its VM state in a block node, one of @state_nodes or @state_files:
    see _load_fresh()."""
    qmp = QMPClient('vmsnap')
    await qmp.connect(qmp_path)
    try:
        incoming = (await _execute(qmp, 'query-status'))['status'] == \
            'inmigrate'
        group = await _find(qmp, tag, state_nodes, state_files)
        if group.unfinished:
            raise RuntimeError(
                f'group {tag!r} did not finish: the internal snapshots of '
                f'{", ".join(group.unfinished)} are named '
                f'{tag + UNFINISHED!r}; delete the group')
        if incoming:
            reverts = await _check_fresh(qmp, group, log)
        elif group.instant:
            await _load_in_place(qmp, group, log)
            return group
        elif not group.state_node:
            raise RuntimeError(f'group {tag!r} has no VM state in an '
                               f'internal snapshot (disks only: '
                               f'{", ".join(group.disks)})')
        else:
            log(f'loading group {tag!r}: disks {", ".join(group.disks)}, '
                f'VM state in {group.state_node}')
            await _run_job(qmp, f'vmsnap-load-{os.getpid()}',
                           'snapshot-load',
                           {'tag': tag, 'vmstate': group.state_node,
                            'devices': group.disks})
            group.loaded = 'in place'
            return group
    finally:
        await qmp.disconnect()
    return await _load_fresh(qmp_path, group, reverts, log)


async def _load_in_place(qmp, group, log):
    """snapshot-group-load: the group's internal disks reverted and its
    VM state in a block node loaded, in this running QEMU.  QEMU refuses,
    with the guest running on, a group with an external or drained
    disk, which loads into a fresh QEMU."""
    node = group.state_node
    if group.state_file:
        node = f'vmsnap-load-{os.getpid()}'
        await _execute(qmp, 'blockdev-add', dict(
            _node_options(node, group.state_file, 'raw'),
            **{'read-only': True}))
    log(f'loading group {group.tag!r} in place: disks '
        f"{', '.join(d['node-name'] for d in group.recorded_disks)}, "
        f'VM state in {group.state_file or node}')
    try:
        await _run_job(qmp, f'vmsnap-load-{os.getpid()}',
                       'snapshot-group-load',
                       {'tag': group.tag, 'vmstate': {'node-name': node}})
    finally:
        if group.state_file:
            await _blockdev_del(qmp, node, lambda msg: None)
    group.loaded = 'in place'
    group.vm_status = (await _execute(qmp, 'query-status'))['status']


def _chain(nodes, node):
    """The file names of the images under @node, from its backing
    children in @nodes (query-named-block-nodes, by node name)."""
    names = []
    while True:
        backing = next((c['node-name'] for c in node.get('children', [])
                        if c['child'] == 'backing'), None)
        if backing not in nodes:
            return names
        node = nodes[backing]
        names.append(node['file'])


async def _check_fresh(qmp, group, log):
    """Refuse what cannot load group @group into this fresh QEMU, with
    the part missing or wrong named: the internal disks to revert, as
    (node, image)."""
    tag = group.tag
    where = group.state_file or group.state_node
    if not group.instant:
        if group.state_node:
            raise RuntimeError(
                f'group {tag!r} has its VM state in the internal snapshot '
                f'of {group.state_node}: load it in place, in a QEMU '
                f'started without -incoming')
        raise RuntimeError(f'no VM state of group {tag!r} given: pass the '
                           f'--state-file or --state-node that holds it')
    if not group.complete:
        raise RuntimeError(f'the VM state of group {tag!r} in {where} is '
                           f'incomplete: its save did not finish')
    nodes = {n['node-name']: n for n in
             await _execute(qmp, 'query-named-block-nodes', {'flat': True})}
    reverts = []
    for d in group.recorded_disks:
        name, action = d['node-name'], d['action']
        node = nodes.get(name)
        if node is None:
            raise RuntimeError(f"disk {name} of group {tag!r} ({action}, "
                               f"{d['filename']}) is not a node in this "
                               f"QEMU")
        if action == 'internal':
            if tag not in [sn['name'] for sn in
                           node['image'].get('snapshots', [])]:
                raise RuntimeError(f"disk {name} ({node['file']}) has no "
                                   f"internal snapshot {tag!r}")
            if node.get('active', False):
                raise RuntimeError(f'disk {name} is active in this QEMU: '
                                   f'its internal snapshot cannot be '
                                   f'reverted under it')
            reverts.append((name, node['file']))
        elif action == 'external':
            # The image the group left under its overlay holds the disk
            # as of the instant; one on top of it is from later
            if node['file'] != d['filename'] and \
                    d['filename'] in _chain(nodes, node):
                raise RuntimeError(
                    f"disk {name} is on {node['file']}, which lies on top "
                    f"of {d['filename']}, the image group {tag!r} left "
                    f"under its overlay: the disk is from after the "
                    f"group's instant")
        else:
            log(f"disk {name} was drained: {node['file']} must be the "
                f"storage snapshot taken while the group held it")
    return reverts


async def _load_fresh(qmp_path, group, reverts, log):
    """Load @group into a QEMU started with -incoming defer on its
    images: each internal disk is first reverted to its snapshot with
    qemu-img (the disk's node is inactive until the load completes, when
    QEMU reads its metadata again, as after a migration with shared
    storage), then the VM state loads from its block node, which QEMU
    refuses if it is incomplete, truncated or its checksums are wrong.
    Nothing is changed when a check of _check_fresh() fails."""
    # pylint: disable=import-outside-toplevel
    from .state import load_state
    qemu_img = find_qemu_img() if reverts else None
    for name, image in reverts:
        log(f'reverting {name} ({image}) to its internal snapshot '
            f'{group.tag!r}')
        out = await asyncio.to_thread(
            subprocess.run, [qemu_img, 'snapshot', '-a', group.tag, image],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            check=False)
        if out.returncode != 0:
            raise RuntimeError(f'qemu-img snapshot -a {group.tag} {image} '
                               f'failed: {out.stdout.strip()}')
        group.reverted.append(name)
    result = await load_state(qmp_path, node=group.state_node,
                              file=group.state_file, log=log)
    if not result.ok:
        raise RuntimeError(f'the VM state of group {group.tag!r} did not '
                           f'load: {result.error}')
    group.loaded = 'fresh QEMU'
    group.vm_status = result.vm_status
    return group


async def _discard_state(qmp, group, log):
    """Delete the group's VM state in a block node (a file: opened for
    the deletion only), so that it never loads again."""
    node = group.state_node
    if group.state_file:
        node = f'vmsnap-discard-{os.getpid()}'
        await _execute(qmp, 'blockdev-add', dict(
            _node_options(node, group.state_file, 'raw'), discard='unmap'))
    try:
        await _execute(qmp, 'discard-vmstate-node', {'node-name': node})
    finally:
        if group.state_file:
            await _blockdev_del(qmp, node, lambda msg: None)
    log(f'VM state in {group.state_file or node} deleted')


async def _overlays(qmp, group):
    """For each external overlay the group put on: (overlay, the node
    under it now, the root node of its chain, for block-commit)."""
    nodes = {n['node-name']: n for n in
             await _execute(qmp, 'query-named-block-nodes', {'flat': True})}
    parent = {c['node-name']: name for name, n in nodes.items()
              for c in n.get('children', [])}
    found = []
    for d in group.recorded_disks:
        if d['action'] != 'external':
            continue
        overlay = nodes.get(d['overlay'])
        base = next((c['node-name'] for c in (overlay or {}).get(
            'children', []) if c['child'] == 'backing'), None)
        if base is None:
            raise RuntimeError(f"the group's overlay {d['overlay']!r} "
                               f"of {d['node-name']!r} is not a node with "
                               f"a backing node here")
        root = d['overlay']
        while root in parent:
            root = parent[root]
        found.append((d['overlay'], base, root))
    return found


async def _commit(qmp, overlay, base, root, log):
    """Merge @overlay back into @base, the node under it (block-commit;
    an active commit is completed once it is ready)."""
    job_id = f'vmsnap-commit-{os.getpid()}'
    log(f'merging overlay {overlay!r} back into {base!r} (block-commit)')
    await _execute(qmp, 'block-commit', {
        'job-id': job_id, 'device': root, 'top-node': overlay,
        'base-node': base, 'auto-dismiss': False})
    completed = False
    while True:
        job = next(j for j in await _execute(qmp, 'query-jobs')
                   if j['id'] == job_id)
        if job['status'] == 'ready' and not completed:
            await _execute(qmp, 'job-complete', {'id': job_id})
            completed = True
        elif job['status'] == 'concluded':
            break
        await asyncio.sleep(POLL_S)
    await _execute(qmp, 'job-dismiss', {'id': job_id})
    if 'error' in job:
        raise RuntimeError(f'block-commit of {overlay!r}: {job["error"]}')
    # The overlay's node was added for the group; it holds nothing now
    try:
        await _execute(qmp, 'blockdev-del', {'node-name': overlay})
    except ExecuteError:
        pass


async def delete_group(qmp_path: str, tag: str, state_nodes=(),
                       state_files=(),
                       log: Callable[[str], None] = print) -> GroupInfo:
    """Delete group @tag: first its VM state in a block node, when one
    of @state_nodes or @state_files records the group, so that no part
    of a half-deleted group loads; then its internal snapshots, their VM
    state with them (snapshot-delete); then its external overlays, each
    merged back into the node under it, so that the backing chain does
    not grow with every group.  Every overlay is found before anything
    is deleted; a step that fails after the state is gone names what is
    left.  What drained disks' storage snapshots hold is the storage's
    to delete."""
    qmp = QMPClient('vmsnap')
    await qmp.connect(qmp_path)
    try:
        group = await _find(qmp, tag, state_nodes, state_files)
        overlays = await _overlays(qmp, group)
        if group.missing:
            log(f'warning: no internal snapshot {tag!r} on '
                f'{", ".join(group.missing)} any more')
        if group.instant:
            await _discard_state(qmp, group, log)
        snapshots = [(name, disks) for name, disks in
                     ((tag, group.disks), (tag + UNFINISHED, group.unfinished))
                     if disks]
        left = [f'internal snapshots {name!r} on {", ".join(disks)}'
                for name, disks in snapshots]
        left += [f'overlay {o}' for o, _, _ in overlays]
        try:
            for name, disks in snapshots:
                log(f'deleting the internal snapshots {name!r} of '
                    f'{", ".join(disks)}')
                await _run_job(qmp, f'vmsnap-delete-{os.getpid()}',
                               'snapshot-delete',
                               {'tag': name, 'devices': disks})
                left.pop(0)
            for overlay, base, root in overlays:
                await _commit(qmp, overlay, base, root, log)
                left.pop(0)
        except Exception as err:
            what = ('; its VM state is deleted already' if group.instant
                    else '')
            raise RuntimeError(f'{err}; left of group {tag!r}: '
                               f'{", ".join(left)}{what}') from err
        for d in group.recorded_disks:
            if d['action'] == 'drain':
                log(f"{d['node-name']} was drained: its storage snapshot "
                    f"is deleted with the storage's own tools")
        return group
    finally:
        await qmp.disconnect()
