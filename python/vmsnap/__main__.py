"""Command line: vmsnap drain-snapshot | group create|list|load|delete |
save-state | load-state | state-size | export-delta ...
(or python -m vmsnap ...)"""

import argparse
import json
import sys

from . import drain


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='vmsnap',
        description='Live VM snapshots with the patched QEMU.')
    sub = parser.add_subparsers(dest='command', required=True)
    _add_state_commands(sub)
    p = sub.add_parser(
        'drain-snapshot',
        help='drain block nodes, snapshot the storage underneath, resume',
        description='Freeze the guest (optional), drain the block nodes, '
        'run the host snapshot, end the drain and thaw, whatever happens. '
        'Methods: "lvm VG/LV NAME SIZE", "btrfs SUBVOLUME DEST", '
        '"reflink SRC DEST", "rbd POOL/IMAGE@SNAP", '
        '"command \'SHELL COMMAND\'".')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    p.add_argument('--qga', help="qemu-guest-agent's unix socket; "
                   'freeze the guest filesystems around the snapshot')
    p.add_argument('--nodes', required=True,
                   help='comma-separated block node names')
    p.add_argument('--timeout', type=int, default=60,
                   help='seconds after which QEMU ends the drain by itself '
                   '(default 60)')
    p.add_argument('--id', help='drain id (default vmsnap-PID)')
    p.add_argument('--json', action='store_true',
                   help='print the result as JSON on the last line')
    p.add_argument('method',
                   choices=['lvm', 'btrfs', 'reflink', 'rbd', 'command'])
    p.add_argument('args', nargs='+', help='arguments of the method')
    _add_group_commands(sub)
    _add_delta_command(sub)
    opts = parser.parse_args(argv)
    if opts.command == 'group':
        return _group_command(parser, opts)
    if opts.command == 'export-delta':
        return _delta_command(parser, opts)
    if opts.command != 'drain-snapshot':
        return _state_command(parser, opts)

    try:
        snapshot = drain.snapshot_command(opts.method, opts.args)
    except ValueError as err:
        parser.error(str(err))
    result = drain.run(opts.qmp, opts.nodes.split(','), snapshot,
                       timeout=opts.timeout, qga_path=opts.qga,
                       drain_id=opts.id,
                       log=lambda msg: print(msg, flush=True))
    if opts.json:
        print(json.dumps(result.__dict__ | {'ok': result.ok}))
    if result.ok:
        print(f'done: guest I/O held {result.held_ms} ms; the vCPUs kept '
              'running')
        return 0
    print(f'FAILED: {result.error}', file=sys.stderr)
    return 1


def _add_delta_command(sub):
    p = sub.add_parser(
        'export-delta',
        help="what changed between two internal snapshots of a disk",
        description='Back up internal snapshot TO of a running qcow2 disk, '
        'or only what changed in it since snapshot FROM, as the image\'s '
        'metadata says.  --output writes a new qcow2 image with QEMU\'s '
        'backup job (on top of --backing, a copy of FROM: a backup chain '
        'of ordinary qcow2 images); --nbd exports TO over NBD with the '
        'changed ranges as the qemu:dirty-bitmap:delta metadata context, '
        'until interrupted.')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    p.add_argument('--node', required=True, help='the qcow2 block node')
    p.add_argument('--to', required=True, dest='to_snapshot',
                   help='the internal snapshot to back up (ID or name)')
    p.add_argument('--from', dest='from_snapshot',
                   help='the earlier internal snapshot; without it, a '
                   'full backup')
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument('--output', help='the new qcow2 image to write')
    where.add_argument('--nbd', metavar='SOCKET',
                       help='export over NBD on this unix socket')
    p.add_argument('--backing', help='the previous backup, a copy of '
                   'FROM: the backing file of --output')
    p.add_argument('--json', action='store_true',
                   help='print the result as JSON on the last line')


def _delta_command(parser, opts):
    from .delta import export_delta, result_json
    from .interrupt import run_interruptible

    if opts.output and opts.from_snapshot and not opts.backing:
        parser.error('--from with --output needs --backing (the backup of '
                     'the FROM snapshot)')

    def progress(done, total):
        if total:
            print(f'progress: {done} of {total} bytes '
                  f'({100 * done // total} %)', flush=True)

    result = run_interruptible(export_delta(
        opts.qmp, opts.node, opts.to_snapshot, opts.from_snapshot,
        output=opts.output, backing=opts.backing, nbd_socket=opts.nbd,
        progress=progress, log=lambda msg: print(msg, flush=True)))
    if result.ok and opts.output:
        print(f'done: {result.written_bytes} bytes copied, '
              f'{result.changed_bytes} changed of {result.size}, in '
              f'{result.total_ms:.0f} ms')
    if not result.ok:
        print(f'FAILED: {result.error}', file=sys.stderr)
    if opts.json:
        print(result_json(result))
    return 0 if result.ok else 1


def _add_group_commands(sub):
    group = sub.add_parser(
        'group', help='disks and VM state at one instant (snapshot-group)')
    gsub = group.add_subparsers(dest='group_command', required=True)
    p = gsub.add_parser(
        'create', help='take disks and the VM state at one instant',
        description='Start a snapshot-group job in QEMU and follow it: '
        'each --disk is NODE=internal (qcow2 internal snapshot named by '
        'the tag), NODE=external:OVERLAY (a node added with blockdev-add '
        'goes on top) or NODE=drain (guest I/O held while --storage-command '
        'snapshots the storage underneath, then released).')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    p.add_argument('--tag', required=True,
                   help='name of the group: of its internal snapshots '
                   'and drains')
    p.add_argument('--disk', action='append', default=[], required=True,
                   help='NODE=internal, NODE=drain or NODE=external:OVERLAY '
                   '(repeat for each disk)')
    where = p.add_mutually_exclusive_group()
    where.add_argument('--state-file', help='save the VM state into this '
                       'raw image, created at the size QEMU asks for')
    where.add_argument('--state-node', help='save the VM state into this '
                       'block node')
    where.add_argument('--state-internal', metavar='NODE',
                       help='save the VM state into the internal snapshot '
                       'of NODE, one of the internal disks, as savevm does')
    p.add_argument('--instant', choices=['start', 'end'], default='start',
                   help='start: the guest as the command ran (default); '
                   'end: at the end of an iterative save')
    p.add_argument('--drain-timeout', type=int, default=60,
                   help='seconds after which QEMU ends the drains by '
                   'itself (default 60)')
    p.add_argument('--storage-command', metavar="'SHELL COMMAND'",
                   help='snapshots the drained disks\' storage (lvcreate '
                   '-s, btrfs subvolume snapshot, rbd snap create, cp '
                   '--reflink); run with sh -c while the drain holds')
    p.add_argument('--json', action='store_true',
                   help='print the result as JSON on the last line')

    p = gsub.add_parser(
        'list', help='the groups QEMU records (internal snapshots, and '
        'the VM states given)',
        description='List the groups whose disks have internal snapshots '
        'named by their tag, with the disk holding the VM state if any; '
        'and the groups that the VM states given in block nodes or files '
        'record of themselves: instant, disks and actions, and whether '
        'the save finished.')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    _state_arguments(p, 'holding a VM state', 'opened read-only')
    p.add_argument('--json', action='store_true', help='print JSON')
    for name, text in (('load', 'take the guest back to a group: in a '
                        'running QEMU, in place (internal disks and VM '
                        'state, with snapshot-load or, for a state in a '
                        'block node, snapshot-group-load); in a QEMU started '
                        'with -incoming defer on the group\'s images, '
                        'from its VM state in a block node, the internal '
                        'disks reverted first (qemu-img snapshot -a)'),
                       ('delete', "delete a group: its VM state in a block "
                        'node (discard-vmstate-node), its internal '
                        'snapshots with their VM state (snapshot-delete), '
                        'and its external overlays, merged back into the '
                        'disks under them (block-commit)')):
        p = gsub.add_parser(name, help=text, description=text)
        p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
        p.add_argument('--tag', required=True, help='the group')
        _state_arguments(p, "that may hold the group's VM state",
                         f'opened for the {name}')
        p.add_argument('--json', action='store_true',
                       help='print the result as JSON on the last line')


def _state_arguments(p, holding, opened):
    """--state-node and --state-file, repeatable: VM states in block
    nodes that record their groups."""
    p.add_argument('--state-node', action='append', default=[],
                   metavar='NODE', help=f'a block node {holding} '
                   '(repeatable)')
    p.add_argument('--state-file', action='append', default=[],
                   metavar='FILE', help=f'a raw image or block device '
                   f'{holding}, {opened} (repeatable)')


def _group_line(g):
    where = g.state_node or g.state_file
    if g.instant:
        state = f'VM state in {where} ({g.state_bytes} bytes reserved)'
    else:
        state = (f'VM state {g.state_bytes} bytes in {where}' if where
                 else 'no VM state')
    line = f'{g.tag}: disks {", ".join(g.disks) or "none"}; {state}'
    if g.instant:
        actions = ', '.join(f"{d['node-name']} {d['action']}"
                            for d in g.recorded_disks)
        line += (f'; {g.instant} instant, recorded: {actions}; '
                 f'{"complete" if g.complete else "INCOMPLETE"}')
    if g.missing:
        line += f'; missing internal snapshots on {", ".join(g.missing)}'
    if g.unfinished:
        # pylint: disable-next=import-outside-toplevel
        from .group import UNFINISHED
        line += (f'; INCOMPLETE: QEMU did not finish it (snapshots named '
                 f'{g.tag}{UNFINISHED} on {", ".join(g.unfinished)})')
    return line


def _group_info_command(opts):
    import asyncio  # pylint: disable=import-outside-toplevel
    from . import group  # pylint: disable=import-outside-toplevel

    def log(msg):
        print(msg, flush=True)

    try:
        if opts.group_command == 'list':
            groups = asyncio.run(group.list_groups(
                opts.qmp, opts.state_node, opts.state_file))
            if opts.json:
                print(json.dumps([g.__dict__ for g in groups]))
            for g in groups if not opts.json else []:
                print(_group_line(g))
            return 0
        if opts.group_command == 'load':
            call = group.load_group(opts.qmp, opts.tag, opts.state_node,
                                    opts.state_file, log=log)
        else:
            call = group.delete_group(opts.qmp, opts.tag, opts.state_node,
                                      opts.state_file, log=log)
        info = group.run_interruptible(call)
    except Exception as err:        # pylint: disable=broad-except
        if getattr(opts, 'json', False):
            print(json.dumps({'ok': False, 'error': str(err)}))
        print(f'FAILED: {err}', file=sys.stderr)
        return 1
    if opts.json:
        print(json.dumps(dict(info.__dict__, ok=True)))
    done = 'deleted'
    if opts.group_command == 'load':
        done = f'loaded ({info.loaded}'
        if info.reverted:
            done += f', {", ".join(info.reverted)} reverted first'
        done += f'; guest {info.vm_status})' if info.vm_status else ')'
    print(f'done: group {opts.tag!r} {done}')
    return 0


def _group_command(parser, opts):
    from . import group  # pylint: disable=import-outside-toplevel

    if opts.group_command != 'create':
        return _group_info_command(opts)
    try:
        disks = [group.parse_disk(d) for d in opts.disk]
    except ValueError as err:
        parser.error(str(err))
    result = group.create(opts.qmp, opts.tag, disks,
                          state_file=opts.state_file,
                          state_node=opts.state_node,
                          state_internal=opts.state_internal,
                          instant=opts.instant,
                          drain_timeout=opts.drain_timeout,
                          storage_command=opts.storage_command,
                          log=lambda msg: print(msg, flush=True))
    if opts.json:
        print(json.dumps(result.__dict__))
    if result.ok:
        held = (f'; drained disks held {result.drain_held_ms} ms'
                if result.drain_held_ms is not None else '')
        print(f'done: group {result.tag!r} at the {result.instant} '
              f'instant; guest paused {result.pause_ms or 0:.1f} ms; '
              f'{result.state_bytes} bytes of VM state{held}')
        return 0
    print(f'FAILED: {result.error}', file=sys.stderr)
    return 1


def _add_state_commands(sub):
    def target(p, create):
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument('--node', help='an existing block node (added '
                           'with blockdev-add, not attached to the guest)')
        where.add_argument('--file', help='an image file (or block device); '
                           'a node is added on it for the %s and removed '
                           'afterwards' % ('save' if create else 'load'))
        p.add_argument('--format', choices=['raw', 'qcow2'],
                       help='format of --file (default: raw with --create, '
                       'else detected)')
        p.add_argument('--offset', type=_size, default=0,
                       help='where the state starts in the node, in bytes '
                       '(default 0; keep it 1 MiB aligned for O_DIRECT)')
        if create:
            p.add_argument('--create', action='store_true',
                           help='create --file first, of exactly the size '
                           'the state needs (query-vmstate-size + offset)')
        p.add_argument('--json', action='store_true',
                       help='print the result as JSON on the last line')

    p = sub.add_parser(
        'save-state',
        help="save a running VM's state into a block node",
        description="Save the VM state (RAM and devices) of a running "
        "guest into a block node while it keeps running.  Mode end "
        "(default): iterative precopy, the state at the switchover, where "
        "the guest pauses for about --downtime-ms.  Mode start: a "
        "background snapshot, the state as it was when the save began.  "
        "The guest is running again afterwards; Ctrl-C or SIGTERM cancel "
        "the save.")
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    target(p, create=True)
    p.add_argument('--mode', choices=['start', 'end'], default='end',
                   help='which instant the state shows (default end)')
    p.add_argument('--downtime-ms', type=int, default=20,
                   help='mode end: the longest pause at the switchover '
                   'QEMU aims for (downtime-limit, default 20)')
    p.add_argument('--max-write', type=float, default=2.0,
                   help='mode end: switch over at once, whatever the '
                   'pause, after writing this many times the size bound '
                   '(default 2; 0 for no bound)')

    p = sub.add_parser(
        'load-state',
        help='load a saved VM state into a QEMU started with -incoming '
        'defer',
        description='Load a VM state saved by save-state into a QEMU '
        'started with -incoming defer and the configuration of the saved '
        'VM (disk images as they were at the saved instant).')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    target(p, create=False)

    p = sub.add_parser(
        'state-size',
        help='how large a block node for save-state must be',
        description='Print query-vmstate-size: the bytes a save of the VM '
        'state needs at most, from --offset on.')
    p.add_argument('--qmp', required=True, help="QEMU's QMP unix socket")
    p.add_argument('--json', action='store_true',
                   help='print the sizes as JSON')


def _size(text):
    """Bytes, with an optional K, M, G or T suffix (powers of 1024)."""
    mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
    t = text.strip().upper().removesuffix('B').removesuffix('I')
    try:
        if t and t[-1] in mult:
            value = int(t[:-1]) * mult[t[-1]]
        else:
            value = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a size: {text!r}') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'negative size: {text!r}')
    return value


def _fmt_bytes(n):
    if n is None:
        return '-'
    return f'{n} bytes ({n / 1048576:.1f} MiB)'


def _state_command(parser, opts):
    from . import state  # pylint: disable=import-outside-toplevel

    if opts.command == 'state-size':
        try:
            size = state.size(opts.qmp)
        except Exception as err:  # pylint: disable=broad-except
            print(f'FAILED: {err}', file=sys.stderr)
            return 1
        if opts.json:
            print(json.dumps(size))
        else:
            for key in ('header', 'ram', 'device-state', 'checksums', 'total'):
                print(f'{key + ":":14} {_fmt_bytes(size[key])}')
        return 0

    def log(msg):
        print(msg, flush=True)

    kwargs = dict(node=opts.node, file=opts.file, fmt=opts.format,
                  offset=opts.offset, log=log)
    try:
        if opts.command == 'save-state':
            progress = state.Progress(
                sys.stderr, bar=False if opts.json else None)
            result = state.save(opts.qmp, mode=opts.mode,
                                downtime_ms=opts.downtime_ms,
                                max_write=opts.max_write or None,
                                create=opts.create, progress=progress,
                                **kwargs)
        else:
            result = state.load(opts.qmp, **kwargs)
    except ValueError as err:
        parser.error(str(err))

    print(_summary(result))
    if opts.json:
        print(json.dumps(result.as_dict()))
    if result.ok:
        return 0
    print(f'FAILED: {result.error}', file=sys.stderr)
    return 1


def _summary(r):
    where = f'node {r.node!r}' + (f' ({r.file}, {r.format})' if r.file
                                  else '') + f' at offset {r.offset}'
    lines = []
    if r.operation == 'save':
        lines.append(f'{"saved" if r.ok else "NOT saved"}: VM state into '
                     f'{where}')
        lines.append(f'  mode:          {r.mode} (the state '
                     + ('when the save began)' if r.mode == 'start'
                        else 'at the switchover)'))
        lines.append(f'  bytes written: {_fmt_bytes(r.bytes_written)}'
                     + (f' in {r.passes} passes' if r.passes else '')
                     + (' (switched over by --max-write)' if r.forced
                        else ''))
        if r.size:
            lines.append(f'  size bound:    {_fmt_bytes(r.size["total"])} '
                         '(query-vmstate-size)')
        if r.allocated is not None:
            lines.append(f'  on disk:       {_fmt_bytes(r.allocated)} '
                         'allocated')
        pause = ('-' if r.pause_ms is None else
                 f'{r.pause_ms:.1f} ms (from '
                 + ('STOP/RESUME events)' if r.pause_source == 'events'
                    else "query-migrate's downtime)"))
        if r.switchover_ms is not None:
            pause += f', of which {r.switchover_ms:.0f} ms switchover hook'
        lines.append(f'  guest pause:   {pause}')
    else:
        lines.append(f'{"loaded" if r.ok else "NOT loaded"}: VM state from '
                     f'{where}')
    lines.append(f'  status:        {r.status or "-"}'
                 + (f' ({r.error})' if r.error else ''))
    lines.append(f'  total time:    {r.total_ms:.0f} ms')
    lines.append(f'  VM status:     {r.vm_status or "-"}')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
