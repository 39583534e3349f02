#!/usr/bin/env python3
"""What an incremental backup between two internal snapshots costs:
the delta from qcow2's metadata against reading the data.

For each share of changed clusters (1 %, 10 %, 50 % by default), on a
fresh qcow2 image (4 GiB by default, every cluster written), in one QEMU:

  - internal snapshot A; a dirty bitmap starts recording; the change is
    written (runs of 1 MiB at random places) through QEMU; snapshot B;
  - delta     ours: blockdev-snapshot-delta from A to B on a
              snapshot-access node reading B, then blockdev-backup
              sync=bitmap of that node (the changed ranges only);
  - bitmap    upstream's incremental backup of the same change:
              blockdev-backup sync=bitmap with the bitmap that recorded
              the writes since A;
  - full      blockdev-backup sync=full of B: reading the whole image;
  - compare   after QEMU quit, qemu-img compare of A and B (each read
              through a snapshot-access node): it stops at the first
              difference;
  - compare-all  qemu-img compare of B against itself: reading both
              snapshots in full, which finding every difference by
              reading takes.

Backups go to a null-co node, so what is timed is finding and reading
the data.  The image is opened with cache.direct=on (qemu-img compare
with -T none): every byte comes from the disk.  Bytes read are the image
file node's rd_bytes (query-blockstats) for QEMU, and the read() bytes
(rchar) of the qemu-img process for compare.  For ours, the bytes read
beyond the changed data are the metadata: the L1 and L2 tables of both
snapshots.

    PYTHONPATH=python:tests/lib $venv/bin/python scripts/bench-delta.py
        [--size-gib 4] [--changes 1,10,50] [--json out.json]

Nothing asserts on timings; the numbers are for reading.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmsnaptest import guest

MIB = 1024 * 1024
GIB = 1024 * MIB
RUN = MIB               # a change is runs of this size


def qemu_io_bin():
    return os.path.join(os.path.dirname(guest.qemu_img()), 'qemu-io')


class Qemu:
    """A qtest QEMU with the image as node disk0 and a null-co node"""

    def __init__(self, tmp, image, size):
        self.sock = os.path.join(tmp, 'qmp.sock')
        self.proc = subprocess.Popen(
            [guest.qemu_system(), '-accel', 'qtest', '-nodefaults',
             '-display', 'none', '-qmp', f'unix:{self.sock},server=on,'
             'wait=on'], stdin=subprocess.DEVNULL,
            stdout=open(os.path.join(tmp, 'qemu.log'), 'a'),
            stderr=subprocess.STDOUT)
        for _ in range(200):
            self.qmp = QEMUMonitorProtocol(self.sock, server=False)
            try:
                self.qmp.connect()
                break
            except QMPError:
                time.sleep(0.05)
        else:
            self.proc.kill()
            raise RuntimeError('QEMU did not open its QMP socket')
        self.cmd('blockdev-add', driver='qcow2', **{'node-name': 'disk0'},
                 file={'driver': 'file', 'filename': image,
                       'node-name': 'disk0-file',
                       'cache': {'direct': True}})
        self.cmd('blockdev-add', driver='null-co', **{'node-name': 'null'},
                 size=size)

    def cmd(self, command, **args):
        r = self.qmp.cmd_raw(command, args)
        if 'error' in r:
            raise RuntimeError(f"{command}: {r['error']['desc']}")
        return r['return']

    def hmp_io(self, command):
        out = self.cmd('human-monitor-command',
                       **{'command-line': f'qemu-io disk0 "{command}"'})
        if out:
            raise RuntimeError(f'qemu-io {command}: {out}')

    def rd_bytes(self):
        """Bytes QEMU read so far (block statistics are kept per
        BlockBackend, and these nodes have none)"""
        return rchar(self.proc.pid)

    def backup(self, job_id, device, **args):
        """Time and image bytes read of a backup of @device into null"""
        rd0, t0 = self.rd_bytes(), time.monotonic()
        self.cmd('blockdev-backup', **{'job-id': job_id}, device=device,
                 target='null', **{'auto-dismiss': False}, **args)
        while True:
            job = next(j for j in self.cmd('query-jobs') if j['id'] == job_id)
            if job['status'] == 'concluded':
                break
            time.sleep(0.005)
        seconds = time.monotonic() - t0
        self.cmd('job-dismiss', id=job_id)
        if 'error' in job:
            raise RuntimeError(f"backup {job_id}: {job['error']}")
        return seconds, self.rd_bytes() - rd0

    def quit(self):
        self.cmd('quit')
        self.qmp.close()
        self.proc.wait(30)


def rchar(pid):
    with open(f'/proc/{pid}/io') as f:
        for line in f:
            if line.startswith('rchar:'):
                return int(line.split()[1])
    raise RuntimeError(f'no rchar for {pid}')


def make_image(path, size):
    subprocess.run([guest.qemu_img(), 'create', '-q', '-f', 'qcow2', path,
                    str(size)], check=True)
    chunk = 256 * MIB
    cmds = []
    for offset in range(0, size, chunk):
        cmds += ['-c', f'write -P 0x11 {offset} {min(chunk, size - offset)}']
    subprocess.run([qemu_io_bin(), '-f', 'qcow2', '-t', 'none', *cmds,
                    path], check=True, stdout=subprocess.DEVNULL)


def compare(image, first, second):
    """qemu-img compare of two snapshots: seconds and bytes read"""
    def opts(sn):
        return (f'driver=snapshot-access,snapshot={sn},file.driver=qcow2,'
                f'file.file.driver=file,file.file.filename={image},'
                'file.file.cache.direct=on')
    t0 = time.monotonic()
    out = subprocess.run(
        ['sh', '-c', '"$@" >/dev/null; echo rc=$?; cat /proc/$$/io', 'sh',
         guest.qemu_img(), 'compare', '--image-opts', '-T', 'none',
         opts(first), opts(second)], check=True, capture_output=True,
        text=True).stdout
    seconds = time.monotonic() - t0
    rchar = int(next(line.split()[1] for line in out.splitlines()
                     if line.startswith('rchar:')))
    rc = next(line for line in out.splitlines() if line.startswith('rc='))
    assert rc == ('rc=0' if first == second else 'rc=1'), \
        f'compare of {first} and {second}: {rc}'
    return seconds, rchar


def one_change(tmp, size, percent, rng):
    image = os.path.join(tmp, f'disk-{percent}.qcow2')
    make_image(image, size)
    q = Qemu(tmp, image, size)
    try:
        q.cmd('blockdev-snapshot-internal-sync', device='disk0', name='A')
        q.cmd('block-dirty-bitmap-add', node='disk0', name='since-a')
        runs = size // RUN
        changed_runs = rng.sample(range(runs), max(1, runs * percent // 100))
        for i in changed_runs:
            q.hmp_io(f'write -P 0x22 {i * RUN} {RUN}')
        q.cmd('blockdev-snapshot-internal-sync', device='disk0', name='B')
        changed = len(changed_runs) * RUN

        q.cmd('blockdev-add', driver='snapshot-access',
              **{'node-name': 'snap-b'}, file='disk0', snapshot='B')
        rd0, t0 = q.rd_bytes(), time.monotonic()
        delta = q.cmd('blockdev-snapshot-delta', node='disk0',
                      **{'from': 'A'}, to='B',
                      bitmap={'node': 'snap-b', 'name': 'delta'})
        metadata_s, metadata_bytes = time.monotonic() - t0, q.rd_bytes() - rd0
        copy_s, copy_bytes = q.backup('delta', 'snap-b', sync='bitmap',
                                      bitmap='delta', **{'bitmap-mode':
                                                         'never'})
        rows = {'delta': (metadata_s + copy_s, metadata_bytes + copy_bytes)}
        rows['bitmap'] = q.backup('bitmap', 'disk0', sync='bitmap',
                                  bitmap='since-a',
                                  **{'bitmap-mode': 'never'})
        rows['full'] = q.backup('full', 'snap-b', sync='full')
        assert delta['changed'] == changed, (delta, changed)
    finally:
        q.quit()
    # compare stops at the first difference; finding them all means
    # reading both snapshots in full, as it does for two equal ones
    rows['compare'] = compare(image, 'A', 'B')
    rows['compare-all'] = compare(image, 'B', 'B')
    os.unlink(image)
    return {'percent': percent, 'changed': changed,
            'metadata_ms': metadata_s * 1000,
            'metadata_bytes': metadata_bytes,
            'rows': {k: {'ms': s * 1000, 'bytes_read': b}
                     for k, (s, b) in rows.items()}}


def print_table(results, size):
    print(f'\n== Delta between two internal snapshots: {size // GIB} GiB '
          'qcow2 image, 64 KiB clusters, direct I/O ==')
    print(f"{'changed':>8} {'way':<11} {'time ms':>9} {'read MiB':>9} "
          f"{'read/changed':>12} {'vs full':>8} {'vs bitmap':>9}")
    for r in results:
        full = r['rows']['full']['ms']
        bitmap = r['rows']['bitmap']['ms']
        for way in ('delta', 'bitmap', 'full', 'compare', 'compare-all'):
            row = r['rows'][way]
            print(f"{r['percent']:>7}% {way:<11} {row['ms']:>9.0f} "
                  f"{row['bytes_read'] / MIB:>9.1f} "
                  f"{row['bytes_read'] / r['changed']:>12.3f} "
                  f"{full / row['ms']:>7.1f}x {bitmap / row['ms']:>8.2f}x")
        print(f"{'':>8} (delta: metadata walk {r['metadata_ms']:.1f} ms, "
              f"{r['metadata_bytes'] / 1024:.0f} KiB of L1/L2 tables read)")
    print('read/changed: bytes read from the image per changed byte; '
          'vs full, vs bitmap: how many times faster than reading all of '
          'B, and than the dirty-bitmap backup; compare stops at the '
          'first difference, compare-all reads both snapshots in full (B '
          'against itself), as finding every difference by reading must')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size-gib', type=int, default=4)
    ap.add_argument('--changes', default='1,10,50',
                    help='percentages of the image changed, comma-separated')
    ap.add_argument('--json', help='write the results as JSON here')
    args = ap.parse_args()
    size = args.size_gib * GIB
    rng = random.Random(20261201)
    tmp = tempfile.mkdtemp(prefix='vmsnap-bench-delta-',
                           dir=os.environ.get('VMSNAP_BENCH_DIR'))
    t0 = time.monotonic()
    try:
        results = [one_change(tmp, size, int(p), rng)
                   for p in args.changes.split(',')]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, size)
    print(f'\n({time.monotonic() - t0:.0f} s in all)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
