"""Guest-level tests of block-drain-begin / block-drain-end.

They boot the vmsnap test guest (see tests/lib/vmsnaptest/guest.py; the VM
class of tests/lib/vmsnaptest/vm.py runs it with QMP) with data disks on which
the in-guest agent writes numbered, checksummed records, and judge every
result from inside the guest through the agent:

 - ticks must keep coming while a disk is drained (the vCPUs run), while
   no record completes (guest I/O is really held) and records resume
   after the end, whichever way the drain ends;
 - a copy of the images taken on the host during a drain must pass the
   agent's check in a fresh VM and agree with the RAM ledger of the
   running guest; copies that are not one point in time, or that are
   corrupted, must fail the very same check (negative controls).

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_drain.py
"""

import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib

from avocado import Test

from qemu.qmp import QMPError

from vmsnaptest import guest
from vmsnaptest.vm import VM

# On-disk layout of an agent target (guest/agent/vmsnap-agent.c).
REC_MAGIC = b'VMSNAPR1'
REC_SIZE = 4096
NSLOTS = 256
REGION_OFFSET = 1024 * 1024
REC_HEADER = struct.Struct('<8sIIQQQ')     # magic target reserved seq ...
TICKS_PER_S = 100                           # the agent ticks every 10 ms


def read_records(path):
    """{slot: seq} of the valid records in a raw target image."""
    found = {}
    with open(path, 'rb') as f:
        f.seek(REGION_OFFSET)
        region = f.read(NSLOTS * REC_SIZE)
    for slot in range(NSLOTS):
        rec = region[slot * REC_SIZE:(slot + 1) * REC_SIZE]
        magic, _target, _res, seq, _ticks, _ns = REC_HEADER.unpack_from(rec)
        crc, = struct.unpack_from('<I', rec, REC_SIZE - 4)
        if magic == REC_MAGIC and zlib.crc32(rec[:REC_SIZE - 4]) == crc:
            found[slot] = seq
    return found


def newest_record(path):
    """(slot, seq) of the newest valid record in a raw target image."""
    recs = read_records(path)
    if not recs:
        return None, 0
    slot = max(recs, key=recs.get)
    return slot, recs[slot]


class GuestTest(Test):
    """Common set-up: short socket dir, VM bookkeeping, disk helpers."""

    timeout = 150

    def setUp(self):
        # avocado's workdir path is too long for a unix socket (108 bytes).
        self.sockdir = tempfile.mkdtemp(prefix='vmsnap-drain-')
        self.vms = []
        self.started = time.monotonic()

    def tearDown(self):
        # Quit a VM that served a passing test; kill it otherwise.
        ok = self.status == 'PASS'
        for vm in self.vms:
            vm.shutdown(graceful=ok)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.log.info('test took %.1f s', time.monotonic() - self.started)

    def vm(self, name, disks, targets, mode='run', **kw):
        vm = VM(name, self.sockdir, self.logdir, disks, targets, mode,
                n_qmp=kw.pop('n_qmp', 0 if mode == 'check' else 1), **kw)
        self.vms.append(vm)
        vm.launch()
        if mode == 'run':
            vm.agent.wait_ready()
        return vm

    def path(self, name):
        return os.path.join(self.workdir, name)

    def assert_no_agent_errors(self, vm):
        errors = vm.agent_errors()
        self.assertEqual(errors, [], f'agent reported errors; '
                         f'{vm.diagnostics()}')

    def copy_images(self, paths, tag):
        """Copy images on the host (reflink where it can); the copies."""
        copies = []
        for src in paths:
            dst = self.path(f'{tag}-{os.path.basename(src)}')
            subprocess.run(['cp', '--reflink=auto', src, dst], check=True)
            copies.append(dst)
        return copies

    def assert_ran_while_drained(self, mark1, mark2, what='drain'):
        """Between two vm.mark()s: the vCPU ticked, no record completed."""
        (t1, ticks1, lc1), (t2, ticks2, lc2) = mark1, mark2
        expected = (t2 - t1) * TICKS_PER_S
        self.log.info('%s: %d ticks in %.2f s (%.0f expected), records '
                      '%d -> %d', what, ticks2 - ticks1, t2 - t1, expected,
                      lc1, lc2)
        self.assertGreaterEqual(ticks2 - ticks1, 0.5 * expected,
                                'guest ticker stalled while drained')
        self.assertEqual(lc2, lc1, 'a record completed while drained')

    def assert_live_check(self, vm):
        """The running guest's disks agree with its RAM ledger."""
        try:
            return vm.agent.check()
        except AssertionError as e:
            self.fail(f'{e}; {vm.diagnostics()}')


class DrainRunningGuest(GuestTest):
    """The guest keeps running, but its I/O waits, while a disk is drained."""

    def test_ticks_advance_io_held_then_resumes(self):
        disk = guest.make_data_disk(self.path('data.qcow2'), 16)
        vm = self.vm('ticker', [disk], ['/dev/vda'])
        vm.wait_records(50)

        t_b0 = time.monotonic()
        vm.cmd('block-drain-begin', id='tick', nodes=['disk0'], timeout=30)
        t_b1 = time.monotonic()
        drains = vm.cmd('query-block-drains')
        self.assertEqual([(d['id'], d['nodes']) for d in drains],
                         [('tick', ['disk0'])])
        # Let the writer run into the held request before sampling.
        time.sleep(0.2)
        mark1 = vm.mark('drained-1')
        time.sleep(2.0)
        mark2 = vm.mark('drained-2')
        t_e0 = time.monotonic()
        vm.cmd('block-drain-end', id='tick')
        t_e1 = time.monotonic()
        ev = vm.wait_event('BLOCK_DRAIN_END', id='tick')

        # The vCPUs ran at (about) their rate, while the guest's I/O did
        # not get through.
        self.assert_ran_while_drained(mark1, mark2)
        lc2 = mark2[2]

        self.assertEqual(ev['data']['reason'], 'requested')
        held = ev['data']['held-ms']
        self.log.info('held-ms %d (host: begin %.1f ms, window %.0f ms)',
                      held, (t_b1 - t_b0) * 1000, (t_e1 - t_b0) * 1000)
        self.assertGreaterEqual(held, (t_e0 - t_b1) * 1000 - 5)
        self.assertLessEqual(held, (t_e1 - t_b0) * 1000 + 5)
        self.assertEqual(vm.cmd('query-block-drains'), [])

        # Guest I/O resumes, and the disk agrees with the guest's RAM.
        vm.wait_records(lc2 + 20, timeout=10)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)

    def test_timeout_and_disconnect_release_guest_io(self):
        disk = guest.make_data_disk(self.path('data.raw'), 8, fmt='raw')
        vm = self.vm('release', [disk], ['/dev/vda'], n_qmp=2)
        vm.wait_records(20)

        # Timeout: nobody ends the drain, QEMU does after 1 s.
        vm.cmd('block-drain-begin', id='to', nodes=['disk0'], timeout=1)
        time.sleep(0.2)
        _, _, lc1 = vm.mark('timeout-1')
        time.sleep(0.5)
        _, _, lc2 = vm.mark('timeout-2')
        self.assertEqual(lc2, lc1, 'a record completed while drained')
        ev = vm.wait_event('BLOCK_DRAIN_END', timeout=5, id='to')
        self.assertEqual(ev['data']['reason'], 'timeout')
        held_to = ev['data']['held-ms']
        self.assertGreaterEqual(held_to, 995)
        vm.wait_records(lc2 + 20, timeout=10)
        with self.assertRaisesRegex(QMPError, 'No active block drain'):
            vm.cmd('block-drain-end', id='to')

        # Disconnect: a second client begins a drain and goes away.
        other = vm.connect_qmp(1)
        try:
            other.cmd('block-drain-begin', id='dc', nodes=['disk0'],
                      timeout=60)
            time.sleep(0.2)
            _, _, lc3 = vm.mark('disconnect-1')
            self.assertEqual([d['id'] for d in vm.cmd('query-block-drains')],
                             ['dc'])
            time.sleep(0.5)
            _, _, lc4 = vm.mark('disconnect-2')
            self.assertEqual(lc4, lc3, 'a record completed while drained')
        finally:
            other.close()
        ev = vm.wait_event('BLOCK_DRAIN_END', timeout=5, id='dc')
        self.log.info('drains ended by timeout (held %d ms, record %d) and '
                      'disconnect (record %d)', held_to, lc2, lc4)
        self.assertEqual(ev['data']['reason'], 'disconnect')
        self.assertEqual(vm.cmd('query-block-drains'), [])
        vm.wait_records(lc4 + 20, timeout=10)

        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)


class DrainedHostCopy(GuestTest):
    """Images copied on the host during a drain are one consistent state.

    Three record targets, written in this order: a file on the ext4
    filesystem of a qcow2 disk, a raw disk and a blank qcow2 disk, so the
    check covers a filesystem, qcow2 metadata and cross-disk agreement.
    """

    TARGETS = ['/mnt/data/records', '/dev/vdb', '/dev/vdc']
    NODES = ['disk0', 'disk1', 'disk2']
    RAW = 1     # index of the raw disk, parsed on the host as well

    def boot_writer(self):
        self.disks = [
            guest.make_data_disk(self.path('d0-ext4.qcow2'), 32, ext4=True),
            guest.make_data_disk(self.path('d1.raw'), 8, fmt='raw'),
            guest.make_data_disk(self.path('d2.qcow2'), 8),
        ]
        vm = self.vm('writer', self.disks, self.TARGETS)
        # Go round the ring of slots once, so every slot is in use.
        vm.wait_records(NSLOTS + 20)
        return vm

    def drained_copy(self, vm, tag, indexes):
        """Copy disks indexes under one drain; the records then complete.

        Returns (last_complete during the drain, {index: copy path}).
        """
        nodes = [self.NODES[i] for i in indexes]
        vm.cmd('block-drain-begin', id=tag, nodes=nodes, timeout=30)
        time.sleep(0.2)
        t1, ticks1, lc1 = vm.mark(f'{tag}-before-copy')
        copies = {}
        for i in indexes:
            src = self.disks[i]
            dst = self.path(f'{tag}-{os.path.basename(src)}')
            subprocess.run(['cp', '--reflink=auto', src, dst], check=True)
            copies[i] = dst
        t2, ticks2, lc2 = vm.mark(f'{tag}-after-copy')
        vm.cmd('block-drain-end', id=tag)
        ev = vm.wait_event('BLOCK_DRAIN_END', id=tag)
        self.assertEqual(ev['data']['reason'], 'requested')
        self.assertEqual(lc2, lc1, 'a record completed while drained')
        self.log.info('%s: drained %s at record %d, held %d ms, %d ticks in '
                      '%.0f ms', tag, nodes, lc1, ev['data']['held-ms'],
                      ticks2 - ticks1, (t2 - t1) * 1000)
        return lc1, copies

    def check_copies(self, name, copies):
        vm = self.vm(name, copies, self.TARGETS, mode='check')
        result = vm.wait_check()
        self.log.info('%s: CHECK %s %s', name, *result)
        try:
            vm.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        return result, vm

    def test_drained_copy_is_consistent(self):
        vm = self.boot_writer()
        lc, copies = self.drained_copy(vm, 'snap', [0, 1, 2])
        # The running guest carries on, its disks agreeing with its RAM.
        vm.wait_records(lc + 20, timeout=10)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        # On the host: the raw copy holds every record the guest had
        # completed when the drain began, and at most the one in flight.
        _, newest = newest_record(copies[self.RAW])
        self.assertIn(newest, (lc, lc + 1),
                      f'raw copy ends at record {newest}, guest RAM said '
                      f'{lc} was the last complete')

        # In a fresh guest: records intact, disks agree with each other,
        # and the newest one is what the running guest's RAM said.
        (status, detail), check_vm = self.check_copies(
            'check-snap', [copies[i] for i in range(3)])
        self.assertEqual(status, 'OK', f'drained copy failed the check: '
                         f'{detail}; {check_vm.diagnostics()}')
        self.assertIn(detail, (lc, lc + 1))

    def test_check_detects_skewed_copy(self):
        """Negative control: disks copied at different points in time.

        Each disk is copied under its own drain, so each image is clean
        on its own (the ext4 mounts), but the raw disk is older than the
        others: the check must see that the disks disagree.
        """
        vm = self.boot_writer()
        lc_old, old = self.drained_copy(vm, 'early', [self.RAW])
        vm.wait_records(lc_old + 10, timeout=10)
        lc_new, new = self.drained_copy(vm, 'late', [0, 2])
        self.assertGreaterEqual(lc_new, lc_old + 10)
        vm.shutdown()

        copies = {**old, **new}
        (status, detail), check_vm = self.check_copies(
            'check-skewed', [copies[i] for i in range(3)])
        self.assertEqual(status, 'FAIL', f'skewed copy passed the check '
                         f'(record {detail}); {check_vm.diagnostics()}')
        self.assertIn('disks disagree', detail)

    def test_check_detects_corrupt_record(self):
        """Negative control: a drained copy with one record damaged."""
        vm = self.boot_writer()
        lc, copies = self.drained_copy(vm, 'snap', [0, 1, 2])
        vm.shutdown()

        raw = copies[self.RAW]
        slot, seq = newest_record(raw)
        self.assertIn(seq, (lc, lc + 1))
        off = REGION_OFFSET + slot * REC_SIZE + 2048    # inside the payload
        with open(raw, 'r+b') as f:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0xff]))
        self.assertNotIn(slot, read_records(raw))

        (status, detail), check_vm = self.check_copies(
            'check-corrupt', [copies[i] for i in range(3)])
        self.assertEqual(status, 'FAIL', f'corrupted copy passed the check '
                         f'(record {detail}); {check_vm.diagnostics()}')
        self.assertIn(f'target {self.RAW} (/dev/vdb) slot {slot}: bad crc',
                      detail)
