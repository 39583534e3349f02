"""Guest-level tests of saving the VM state into a block node, live.

The test guest's agent writes numbered, checksummed records to two disks
(a qcow2 and a raw image) and keeps memory changing (the dirtier) while
the patched QEMU saves its VM state into a block node with
python/vmsnap/state.py, in both modes and into both image formats:

 - mode "start" (background-snapshot: the state as the save began).
   The guest is stopped, its disk images are copied, the save starts,
   and the guest is continued as soon as the save has captured the
   state: the RAM is then written while the guest runs.
 - mode "end" (precopy: the state at the switchover).  The disk images
   are copied in state.py's at_switchover hook, where QEMU has stopped
   the guest and flushed its disks just before the switchover.

Either way disks and RAM show the same instant.  For each:

 - the guest ran during the save (its ticker advanced, and it completed
   records during and after it), and QEMU resumed it by itself;
 - a fresh QEMU started with -incoming defer on the disk copies loads
   the state; the restored agent's CHECK finds disks and the record
   ledger in its RAM in agreement, and it goes on writing records;
 - negative control (raw target, once per mode): the same state loaded
   with disks copied later, after the guest had written more records,
   must fail that very check, which proves the check can fail.

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_vmstate_node.py
"""

import asyncio
import os
import subprocess
import threading
import time

from vmsnap import state
from vmsnaptest import guest
from vmsnaptest.vm import VM

# state.save(create=True) creates the images with this build's qemu-img
os.environ.setdefault('VMSNAP_QEMU_IMG', guest.qemu_img())

from test_drain import GuestTest, TICKS_PER_S, newest_record

GUEST_MEM = 256         # MiB of guest RAM
DIRTY_MEM = 64          # MiB the agent keeps dirtying ...
DIRTY_RATE = 32         # ... at this many MiB/s
SAVE_TIMEOUT = 120      # s; a save still running then is stuck
# How many records the source must write after the save before the disks
# of the negative control are copied.  The restored guest writes on
# before its CHECK; it must stay well behind the later disks.
NEG_AHEAD = 120
# A guest that does not converge: it dirties BUSY_DIRTY MiB of its
# BUSY_MEM MiB as fast as it can (far beyond what TCG reaches)
BUSY_MEM, BUSY_DIRTY, BUSY_RATE = 512, 128, 8192


def event_time(ev):
    ts = ev['timestamp']
    return ts['seconds'] + ts['microseconds'] / 1e6


class VMStateNode(GuestTest):
    """Live saves into a block node, loaded and checked in the guest."""

    timeout = 240
    TARGETS = ['/dev/vda', '/dev/vdb']

    # ---- helpers ------------------------------------------------------

    def boot_writer(self):
        self.disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                      guest.make_data_disk(self.path('d1.raw'), 8,
                                           fmt='raw')]
        # Monitor 0 is the test's, monitor 1 state.py's.
        vm = self.vm('src', self.disks, self.TARGETS, n_qmp=2,
                     mem=GUEST_MEM, mem_mib=DIRTY_MEM, dirty_mibs=DIRTY_RATE)
        vm.wait_records(50, timeout=60)
        return vm

    def backtrace(self, vm):
        """All threads' backtraces of a (stuck) QEMU, into the log."""
        out = subprocess.run(
            ['gdb', '-p', str(vm.proc.pid), '-batch', '-ex',
             'thread apply all bt 25'], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=120, check=False)
        path = os.path.join(self.logdir, f'{vm.name}-backtrace.txt')
        with open(path, 'w') as f:
            f.write(out.stdout)
        self.log.error('QEMU %s (pid %d) backtraces:\n%s', vm.name,
                       vm.proc.pid, out.stdout)
        return path

    def start_save(self, vm, **kw):
        """state.save_state() on monitor 1, in a thread of its own (the
        test goes on using monitor 0 meanwhile)."""
        box = {}

        def run():
            try:
                box['result'] = asyncio.run(state.save_state(
                    vm.qmp_socks[1], log=lambda m: self.log.info('save: %s',
                                                                 m), **kw))
            except BaseException as err:    # pylint: disable=broad-except
                box['error'] = err
            box['t_end'] = time.monotonic()

        thread = threading.Thread(target=run, daemon=True,
                                  name='vmstate-save')
        thread.start()
        return thread, box

    def finish_save(self, vm, thread, box):
        thread.join(SAVE_TIMEOUT)
        if thread.is_alive():
            info = vm.cmd('query-migrate')
            path = self.backtrace(vm)
            self.fail(f'the save is still running after {SAVE_TIMEOUT} s '
                      f'({info.get("status")}); QEMU backtraces in {path}')
        if 'error' in box:
            raise box['error']
        result = box['result']
        self.assertTrue(result.ok, f'save failed: {result.error}; '
                        f'{vm.diagnostics()}')
        return result, box['t_end']

    def wait_captured(self, vm, timeout=30.0):
        """Wait until a background snapshot has taken the VM state.

        RAM pages are saved only once the migration thread has stopped
        the VM, stashed the device state and write-protected RAM; before
        that, every page counts as remaining.  A guest continued earlier
        would run between the disk copy and the captured state.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = vm.cmd('query-migrate')
            status = info.get('status')
            ram = info.get('ram') or {}
            if status == 'completed' or (
                    status == 'active' and
                    ram.get('remaining', 0) < ram.get('total', 0)):
                return info
            if status in ('failed', 'cancelled'):
                self.fail(f'the save ended {status} before it captured '
                          f'the state: {info.get("error-desc")}')
            if time.monotonic() > deadline:
                path = self.backtrace(vm)
                self.fail(f'the save did not capture the state within '
                          f'{timeout} s ({status}); backtraces in {path}')
            time.sleep(0.01)

    def stop_copy_cont(self, vm, tag):
        """A consistent copy of the disks at another instant."""
        _, _, lc = vm.mark(f'{tag}-before-stop')
        vm.cmd('stop')
        copies = self.copy_images(self.disks, tag)
        vm.cmd('cont')
        return lc, copies

    def restore(self, name, copies, state_file, mode, mem=GUEST_MEM,
                mem_mib=DIRTY_MEM, dirty_mibs=DIRTY_RATE):
        """A fresh QEMU on copies loads state_file; the restored VM.

        Both modes load running: at the end, the guest ran when the save
        took it; at the start, it was stopped for the disk copy then, but
        continued before the save ended, so it went on from the captured
        state, and so does the restored VM.
        """
        vm = VM(name, self.sockdir, self.logdir, copies, self.TARGETS,
                n_qmp=2, mem=mem, mem_mib=mem_mib, dirty_mibs=dirty_mibs,
                extra_args=['-incoming', 'defer'])
        self.vms.append(vm)
        vm.launch()
        result = asyncio.run(state.load_state(
            vm.qmp_socks[1], file=state_file,
            log=lambda m: self.log.info('load: %s', m)))
        self.assertTrue(result.ok, f'load failed: {result.error}; '
                        f'{vm.diagnostics()}')
        self.log.info('%s: loaded in %.0f ms, VM %s', name, result.total_ms,
                      result.vm_status)
        self.assertEqual(result.vm_status, 'running')
        vm.agent.wait_ready(timeout=60)
        return vm

    def assert_ran_during_save(self, vm, label, t0, t1, lc_before):
        ticks = vm.agent.ticks_between(t0, t1)
        expected = (t1 - t0) * TICKS_PER_S
        after = vm.agent.stats()['last_complete']
        self.log.info('%s: the save took %.0f ms; the guest ticked %d '
                      'times (%.0f at full speed); records %d -> %d',
                      label, (t1 - t0) * 1000, ticks, expected, lc_before,
                      after)
        self.assertGreater(ticks, 0, 'the guest did not run during the save')
        self.assertGreater(after, lc_before,
                           'the guest completed no record during the save')
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        return after

    # ---- the saves ----------------------------------------------------

    def save_start(self, vm, state_file, fmt):
        """Mode start: stop, copy the disks, save, cont once captured."""
        vm.events.clear()
        _, _, lc = vm.mark('before-stop')
        vm.cmd('stop')
        copies = self.copy_images(self.disks, 'state')
        t0 = time.monotonic()
        thread, box = self.start_save(vm, file=state_file, fmt=fmt,
                                      create=True, mode='start')
        captured = self.wait_captured(vm)
        vm.cmd('cont')
        t_cont = time.monotonic()
        result, t1 = self.finish_save(vm, thread, box)
        stop = vm.wait_event('STOP')
        resume = vm.wait_event('RESUME')
        pause_ms = (event_time(resume) - event_time(stop)) * 1000
        self.log.info('start: captured %.0f ms after the save began (%s); '
                      'guest paused %.0f ms (stop, copy, capture, cont)',
                      (t_cont - t0) * 1000, captured.get('status'),
                      pause_ms)
        # No STOP/RESUME of the save's own: it found the guest paused, and
        # left it so.  (Continued before the capture, the guest would have
        # run between the disk copy and the saved state; the save would
        # then stop and resume it itself.)
        more = vm.events + vm.qmp.get_events(wait=False)
        vm.qmp.clear_events()
        vm.events = []
        self.assertEqual([e['event'] for e in more
                          if e['event'] in ('STOP', 'RESUME')], [])
        self.assert_ran_during_save(vm, 'start', t_cont, t1, lc)
        return result, copies, lc

    def disk_copier(self):
        """Paths for copies of the disks, and a function that makes them
        (the at_switchover hook of a save at the end)."""
        copies = [self.path(f'state-{os.path.basename(d)}')
                  for d in self.disks]

        def copy_disks():
            for src, dst in zip(self.disks, copies):
                subprocess.run(['cp', '--reflink=auto', src, dst],
                               check=True)
        return copies, copy_disks

    def save_end(self, vm, state_file, fmt):
        """Mode end: copy the disks at the switchover."""
        copies, copy_disks = self.disk_copier()
        _, _, lc = vm.mark('before-save')
        t0 = time.monotonic()
        thread, box = self.start_save(vm, file=state_file, fmt=fmt,
                                      create=True, mode='end', downtime_ms=20,
                                      at_switchover=copy_disks)
        result, t1 = self.finish_save(vm, thread, box)
        self.log.info('end: guest paused %.1f ms (%s), %.0f ms of it '
                      'copying the disks; QEMU downtime %s ms',
                      result.pause_ms or -1, result.pause_source,
                      result.switchover_ms or -1, result.downtime_ms)
        self.assertIsNotNone(result.switchover_ms, 'the hook never ran')
        self.assert_ran_during_save(vm, 'end', t0, t1, lc)
        return result, copies, lc

    def save_load_check(self, mode, fmt, negative=False):
        vm = self.boot_writer()
        state_file = self.path(f'vmstate.{fmt}')
        save = self.save_start if mode == 'start' else self.save_end
        result, copies, lc = save(vm, state_file, fmt)
        self.log.info('%s/%s: %d bytes written, %d allocated, vmstate-size '
                      '%d', mode, fmt, result.bytes_written,
                      result.allocated, result.size['total'])
        self.assertEqual(guest.disk_format(state_file), fmt)

        # The source goes on writing, its disks agreeing with its RAM.
        st = vm.wait_records(lc + 20, timeout=30)
        if negative:
            vm.wait_records(st['last_complete'] + NEG_AHEAD + 1, timeout=60)
            lc_later, later = self.stop_copy_cont(vm, 'later')
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        # On the host: the raw disk copy ends where the guest was when
        # its state was taken (at the stop: lc or the record in flight).
        _, on_disk = newest_record(copies[1])
        if mode == 'start':
            self.assertIn(on_disk, (lc, lc + 1))
        else:
            self.assertGreaterEqual(on_disk, lc)

        restored = self.restore('restored', copies, state_file, mode)
        seq = self.assert_live_check(restored)
        self.log.info('restored: CHECK OK %d (disk copies at record %d)',
                      seq, on_disk)
        # The restored guest's writes complete.
        restored.wait_records(seq + 20, timeout=30)
        self.assert_live_check(restored)
        self.assert_no_agent_errors(restored)
        restored.shutdown()

        if negative:
            self.assertGreaterEqual(lc_later, on_disk + NEG_AHEAD)
            wrong = self.restore('wrong-disks', later, state_file, mode)
            with self.assertRaises(AssertionError,
                                   msg='the state loaded with later disks '
                                   'passed the check') as caught:
                wrong.agent.check()
            reason = str(caught.exception)
            self.log.info('negative control (disks at record %d, RAM at '
                          '%d): %s', lc_later, on_disk, reason)
            # Caught before the restored guest caught up ('newer'), or
            # after it wrote over a later record's slot ('missing').
            self.assertRegex(reason, 'disk newer than RAM|is missing')

        # Passed: the state (a good part of the guest's RAM) can go.
        os.unlink(state_file)

    # ---- the tests ----------------------------------------------------

    def test_start_raw(self):
        self.save_load_check('start', 'raw', negative=True)

    def test_start_qcow2(self):
        self.save_load_check('start', 'qcow2')

    def test_end_raw(self):
        self.save_load_check('end', 'raw', negative=True)

    def test_end_qcow2(self):
        self.save_load_check('end', 'qcow2')

    def test_end_not_converging(self):
        """A guest dirtying memory faster than the target is written: the
        save switches over once it has written max_write times the size
        bound, and the state it took restores consistently."""
        self.disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                      guest.make_data_disk(self.path('d1.raw'), 8,
                                           fmt='raw')]
        vm = self.vm('src', self.disks, self.TARGETS, n_qmp=2, mem=BUSY_MEM,
                     mem_mib=BUSY_DIRTY, dirty_mibs=BUSY_RATE)
        vm.wait_records(50, timeout=60)
        state_file = self.path('vmstate.raw')
        copies, copy_disks = self.disk_copier()
        thread, box = self.start_save(vm, file=state_file, fmt='raw',
                                      create=True, mode='end', downtime_ms=20,
                                      at_switchover=copy_disks, max_write=1.0)
        result, _ = self.finish_save(vm, thread, box)
        bound = result.size['total']
        self.log.info('not converging: %d bytes written in %s passes '
                      '(%.2f x the bound of %d), forced %s, outpaced %s, '
                      'guest paused %.1f ms, QEMU downtime %s ms',
                      result.bytes_written, result.passes,
                      result.bytes_written / bound, bound, result.forced,
                      result.outpaced, result.pause_ms or -1,
                      result.downtime_ms)
        self.assertTrue(result.forced, 'the save converged by itself: the '
                        'guest does not dirty fast enough for this test')
        # The bound, plus the last pass, which writes at most all of RAM
        self.assertLessEqual(result.bytes_written, 2 * bound)
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        # The wrapper put back the downtime-limit it forced
        self.assertEqual(vm.cmd('query-migrate-parameters')['downtime-limit'],
                         300)
        vm.shutdown()

        restored = self.restore('restored', copies, state_file, 'end',
                                mem=BUSY_MEM, mem_mib=BUSY_DIRTY,
                                dirty_mibs=BUSY_RATE)
        seq = self.assert_live_check(restored)
        restored.wait_records(seq + 20, timeout=30)
        self.assert_live_check(restored)
        restored.shutdown()
