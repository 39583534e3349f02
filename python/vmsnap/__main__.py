"""Command line: vmsnap drain-snapshot ... (or python -m vmsnap ...)"""

import argparse
import json
import sys

from . import drain


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='vmsnap',
        description='Live VM snapshots with the patched QEMU.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser(
        'drain-snapshot',
        help='drain block nodes, snapshot the storage underneath, resume',
        description='Freeze the guest (optional), drain the block nodes, '
        'run the host snapshot, end the drain and thaw, whatever happens. '
        'Methods: "lvm VG/LV NAME SIZE", "btrfs SUBVOLUME DEST", '
        '"reflink SRC DEST", "command \'SHELL COMMAND\'".')
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
    p.add_argument('method', choices=['lvm', 'btrfs', 'reflink', 'command'])
    p.add_argument('args', nargs='+', help='arguments of the method')
    opts = parser.parse_args(argv)

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


if __name__ == '__main__':
    sys.exit(main())
