"""Incremental backups of live internal snapshots, checked in the guest.

The test guest's agent writes numbered, checksummed records to a qcow2
disk.  Two live internal snapshots, A and B, are taken with
snapshot-group while it writes; then, with the guest still writing,
``vmsnap export-delta`` (the wrapper users run) backs up A in full and
B as the delta since A, on top of the backup of A, and exports B with
its delta over NBD, as a pull-mode backup tool would read it.

The backup chain is booted in a fresh VM whose agent's CHECK must find
every record intact and the newest one where the guest was when B was
taken.  The negative control puts the same delta on top of a copy of
the disk taken later than A: the ranges the delta leaves to its
backing file then hold newer records, and the CHECK must fail.

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_export_delta.py
"""

import json
import os
import signal
import subprocess
import sys
import time

from vmsnaptest import guest

from test_drain import GuestTest


class ExportDelta(GuestTest):

    timeout = 300
    TARGETS = ['/dev/vda']

    def snapshot(self, vm, tag):
        """A live internal snapshot of disk0; the last record completed
        before it and the first after"""
        _, _, before = vm.mark(f'{tag}-before')
        vm.cmd('snapshot-group', **{'job-id': tag}, tag=tag,
               disks=[{'node-name': 'disk0', 'action': 'internal'}],
               instant='start')
        deadline = time.monotonic() + 60
        while True:
            job = next(j for j in vm.cmd('query-jobs') if j['id'] == tag)
            if job['status'] == 'concluded':
                break
            self.assertLess(time.monotonic(), deadline, f'group {tag}: '
                            f'{job}')
            time.sleep(0.05)
        vm.cmd('job-dismiss', id=tag)
        self.assertNotIn('error', job, f'group {tag} failed: {job}')
        _, _, after = vm.mark(f'{tag}-after')
        self.log.info('snapshot %s between records %d and %d', tag, before,
                      after)
        return before, after

    def wrapper(self, vm, *args, wait=True):
        argv = [sys.executable, '-m', 'vmsnap', 'export-delta', '--qmp',
                vm.qmp_socks[1], '--node', 'disk0', '--json', *args]
        env = dict(os.environ, PYTHONPATH=str(guest.REPO / 'python'))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        if not wait:
            return proc
        out, _ = proc.communicate(timeout=120)
        self.log.info('vmsnap export-delta %s:\n%s', ' '.join(args), out)
        self.assertEqual(proc.returncode, 0, out)
        return json.loads(out.strip().splitlines()[-1])

    def check_chain(self, name, top):
        vm = self.vm(name, [top], self.TARGETS, mode='check')
        result = vm.wait_check()
        self.log.info('%s: CHECK %s %s', name, *result)
        return result, vm

    def test_backup_chain_and_nbd_export(self):
        disk = guest.make_data_disk(self.path('d0.qcow2'), 16)
        # Data the guest does not touch (its records are in the first
        # 2 MiB): in every full backup, in no delta
        subprocess.run([os.path.join(os.path.dirname(guest.qemu_img()),
                                     'qemu-io'), '-f', 'qcow2', '-c',
                        'write -P 0x5a 8M 4M', disk], check=True,
                       stdout=subprocess.DEVNULL)
        vm = self.vm('src', [disk], self.TARGETS, n_qmp=2)
        vm.wait_records(40, timeout=60)
        self.snapshot(vm, 'A')
        vm.wait_records(vm.mark('between')[2] + 30, timeout=60)
        b_before, b_after = self.snapshot(vm, 'B')
        # A copy of the disk later than A, for the negative control
        _, _, lc = vm.mark('later')
        vm.wait_records(lc + 30, timeout=60)
        later = self.path('later.qcow2')
        subprocess.run([guest.qemu_img(), 'convert', '-U', '-O', 'qcow2',
                        disk, later], check=True)

        full = self.wrapper(vm, '--to', 'A', '--output',
                            self.path('A.qcow2'))
        delta = self.wrapper(vm, '--from', 'A', '--to', 'B', '--backing',
                             self.path('A.qcow2'), '--output',
                             self.path('B.qcow2'))
        self.log.info('full backup of A: %d bytes; delta A..B: %d of %d '
                      'bytes changed, %d copied, %.0f ms',
                      full['written_bytes'], delta['changed_bytes'],
                      delta['size'], delta['written_bytes'],
                      delta['total_ms'])
        self.assertGreater(delta['changed_bytes'], 0)
        self.assertLess(delta['changed_bytes'], full['changed_bytes'])

        # Pull mode: what an NBD client reads is B, whatever the guest
        # writes meanwhile; the wrapper removes its export when told to
        # stop
        nbd_sock = os.path.join(self.sockdir, 'nbd.sock')
        pull = self.wrapper(vm, '--from', 'A', '--to', 'B', '--nbd',
                            nbd_sock, wait=False)
        line = pull.stdout.readline()
        while line and 'exporting' not in line:
            line = pull.stdout.readline()
        self.assertIn('exporting', line)
        pulled = self.path('B-pulled.raw')
        subprocess.run([guest.qemu_img(), 'convert', '-f', 'raw', '-O',
                        'raw', f'nbd+unix:///B?socket={nbd_sock}', pulled],
                       check=True)
        extents = json.loads(subprocess.run(
            [guest.qemu_img(), 'map', '--output=json', '--image-opts',
             f'driver=nbd,server.type=unix,server.path={nbd_sock},export=B,'
             'x-dirty-bitmap=qemu:dirty-bitmap:delta'],
            check=True, capture_output=True, text=True).stdout)
        dirty = sum(e['length'] for e in extents if not e['data'])
        self.assertEqual(dirty, delta['changed_bytes'])
        pull.send_signal(signal.SIGTERM)
        out, _ = pull.communicate(timeout=60)
        self.assertEqual(pull.returncode, 0, out)
        self.assertEqual(vm.cmd('query-block-exports'), [])
        self.assertEqual([n['node-name'] for n in
                          vm.cmd('query-named-block-nodes', flat=True)
                          if n['node-name'].startswith('vmsnap')], [])

        # The guest ran through all of it, and is consistent
        vm.wait_records(vm.mark('end')[2] + 20, timeout=60)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        b_raw = self.path('B.raw')
        subprocess.run([guest.qemu_img(), 'convert', '-l', 'B', '-O', 'raw',
                        disk, b_raw], check=True)
        for image, fmt in ((self.path('B.qcow2'), 'qcow2'),
                           (pulled, 'raw')):
            cmp = subprocess.run([guest.qemu_img(), 'compare', '-f', fmt,
                                  '-F', 'raw', image, b_raw],
                                 capture_output=True, text=True)
            self.assertEqual(cmp.returncode, 0, f'{image} is not snapshot '
                             f'B: {cmp.stdout}')

        (status, newest), check_vm = self.check_chain('check-B',
                                                      self.path('B.qcow2'))
        self.assertEqual(status, 'OK', f'the backup chain failed the '
                         f'check: {newest}; {check_vm.diagnostics()}')
        self.assertTrue(b_before <= int(newest) <= b_after + 1,
                        f'the backup of B ends at record {newest}, B was '
                        f'taken between {b_before} and {b_after}')

        # Negative control: the delta on top of a disk later than A
        wrong = self.path('B-on-later.qcow2')
        subprocess.run(['cp', self.path('B.qcow2'), wrong], check=True)
        subprocess.run([guest.qemu_img(), 'rebase', '-u', '-b', later,
                        '-F', 'qcow2', wrong], check=True)
        (status, detail), check_vm = self.check_chain('check-wrong', wrong)
        self.assertEqual(status, 'FAIL', f'the delta on the wrong backing '
                         f'file passed the check (record {detail}); '
                         f'{check_vm.diagnostics()}')
