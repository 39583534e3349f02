"""Guest-level tests: a drain combined with a VM state save, and a drain
of disks whose devices run in an iothread.

A VM state saved while a drain holds guest requests would lose them (the
device has taken them off the guest's queues, the BlockBackend holds
them), and the restored guest would wait forever for its writes.  So
QEMU refuses any VM state capture while a drain is active.  The control
is the same sequence with stop/cont instead of the drain: its state,
loaded into a fresh QEMU on the copied disks, must give a guest whose
agent finds disks and RAM in agreement and whose writes still complete.
That control is also what fails if a saved state loses requests.  It
runs with the plain migration stream and with mapped-ram.

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_drain_vmstate.py
"""

import os
import time

from qemu.qmp import QMPError

from vmsnaptest import guest
from vmsnaptest.vm import VM

from test_drain import GuestTest, NSLOTS


class DrainAndVMState(GuestTest):
    """Disks drained or VM stopped, images copied, VM state saved."""

    TARGETS = ['/dev/vda', '/dev/vdb']
    NODES = ['disk0', 'disk1']

    def boot_writer(self, **kw):
        self.disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                      guest.make_data_disk(self.path('d1.raw'), 8,
                                           fmt='raw')]
        vm = self.vm('writer', self.disks, self.TARGETS, **kw)
        vm.wait_records(NSLOTS + 20)
        return vm

    def background_snapshot(self, vm, state, mapped_ram=False):
        vm.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'background-snapshot', 'state': True},
            {'capability': 'mapped-ram', 'state': mapped_ram}])
        vm.cmd('migrate', uri=f'file:{state}')

    @staticmethod
    def wait_migration(vm, timeout=60.0):
        """Poll query-migrate until the migration ends; its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = vm.cmd('query-migrate').get('status')
            if status in ('completed', 'failed', 'cancelled'):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f'migration still {status} after '
                                     f'{timeout} s; {vm.diagnostics()}')
            time.sleep(0.1)

    def test_state_save_refused_during_drain(self):
        vm = self.boot_writer()
        vm.cmd('block-drain-begin', id='snap', nodes=self.NODES, timeout=30)
        time.sleep(0.2)
        _, _, lc1 = vm.mark('drained')
        self.copy_images(self.disks, 'drained')
        state = self.path('drained.state')
        with self.assertRaisesRegex(QMPError, "Block drain 'snap' is active"):
            self.background_snapshot(vm, state)
        with self.assertRaisesRegex(QMPError, "Block drain 'snap' is active"):
            self.hmp_error(vm, 'savevm s1')
        _, _, lc2 = vm.mark('refused')
        self.assertEqual(lc2, lc1, 'a record completed while drained')
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        vm.cmd('block-drain-end', id='snap')
        vm.wait_event('BLOCK_DRAIN_END', id='snap')

        # Nothing was started, nothing was lost: the guest carries on.
        self.assertFalse(os.path.exists(state) and os.path.getsize(state),
                         'a refused save wrote a state file')
        vm.wait_records(lc2 + 20, timeout=10)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)

    @staticmethod
    def hmp_error(vm, cmdline):
        """HMP reports errors as text; raise them as QMPError."""
        out = vm.cmd('human-monitor-command', **{'command-line': cmdline})
        if 'rror' in out:
            raise QMPError(out)
        return out

    def test_control_stop_cont_state_loads(self):
        """Control: stop, copy, save, cont; the state loads and runs on."""
        self.stop_save_cont_load(mapped_ram=False)

    def test_control_stop_cont_state_loads_mapped_ram(self):
        """The same with mapped-ram (before the fix in patch 8, the state
        loaded with all guest RAM zero)."""
        self.stop_save_cont_load(mapped_ram=True)

    def stop_save_cont_load(self, mapped_ram):
        vm = self.boot_writer()
        _, _, lc = vm.mark('before-stop')     # a stopped guest cannot answer
        vm.cmd('stop')
        copies = self.copy_images(self.disks, 'stopped')
        state = self.path('stopped.state')
        self.background_snapshot(vm, state, mapped_ram)
        self.assertEqual(self.wait_migration(vm), 'completed')
        vm.cmd('cont')
        vm.wait_records(lc + 20, timeout=10)
        vm.shutdown()

        restored = VM('restored', self.sockdir, self.logdir, copies,
                      self.TARGETS, extra_args=['-incoming', 'defer'])
        self.vms.append(restored)
        restored.launch()
        restored.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'mapped-ram', 'state': mapped_ram}])
        restored.cmd('migrate-incoming', uri=f'file:{state}')
        self.assertEqual(self.wait_migration(restored), 'completed')
        if restored.cmd('query-status')['status'] != 'running':
            restored.cmd('cont')
        # The restored guest's writes complete, and its disks (copied
        # while it was stopped) agree with the RAM ledger it came back with.
        st = restored.wait_records(lc + 20, timeout=30)
        self.log.info('restored guest went on from record %d to %d', lc,
                      st['last_complete'])
        self.assert_live_check(restored)
        self.assert_no_agent_errors(restored)


class DrainIothread(GuestTest):
    """A drain of virtio-blk disks whose devices run in an iothread."""

    TARGETS = ['/dev/vda', '/dev/vdb']
    NODES = ['disk0', 'disk1']

    def test_drain_iothread_disks(self):
        disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                 guest.make_data_disk(self.path('d1.raw'), 8, fmt='raw')]
        vm = self.vm('iothread', disks, self.TARGETS, iothread=True)
        vm.wait_records(NSLOTS + 20)

        vm.cmd('block-drain-begin', id='io', nodes=self.NODES, timeout=30)
        time.sleep(0.2)
        mark1 = vm.mark('drained-1')
        time.sleep(1.0)
        copies = self.copy_images(disks, 'copy')
        mark2 = vm.mark('drained-2')
        vm.cmd('block-drain-end', id='io')
        vm.wait_event('BLOCK_DRAIN_END', id='io')

        self.assert_ran_while_drained(mark1, mark2, 'iothread drain')
        lc1 = mark1[2]
        vm.wait_records(lc1 + 20, timeout=10)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        check = self.vm('check-iothread', copies, self.TARGETS, mode='check')
        status, detail = check.wait_check()
        self.assertEqual(status, 'OK', f'drained copy failed the check: '
                         f'{detail}; {check.diagnostics()}')
        self.assertIn(detail, (lc1, lc1 + 1))
