"""Guest-level test of a start-instant save taken the natural way.

A backup tool that wants the disks and the VM state of a running guest
at one instant does the obvious thing: ``stop``, a ``transaction`` of
external snapshots of the disks (from then on the guest writes into
new overlays, and the images underneath hold the disks as of that
instant), ``migrate`` into a block node with ``background-snapshot``
(the state as the save began), and ``cont`` as soon as ``migrate``
returns, because the guest should pause as little as possible.

A background snapshot takes the device state only after its setup, in
the migration thread.  Continued before that, the guest ran on after
the disk snapshots, and the save then stopped it a second time and
took the state there: RAM later than the disks.  Restored, such a
guest fails its own check ("disk older than RAM").  The caller did
nothing wrong, so QEMU must give a consistent snapshot here: a ``cont``
that comes while a background snapshot has not yet taken the state
keeps the guest paused, and the save resumes it once it has taken the
state.  The state then loads running, as the caller asked for.  A cont
that comes after the save has taken the state (a slow host) continues
the guest at once; it went on from the state taken, so the state loads
running then too.

The test guest's agent writes numbered, checksummed records to two
disks (a qcow2 and a raw image) and keeps memory changing.  Each of
ROUNDS rounds, on the same source VM:

 - stop, transaction of blockdev-snapshot-sync of both disks onto new
   qcow2 overlays, migrate into a raw image of query-vmstate-size's
   size (mapped-ram, background-snapshot), cont at once (the next
   command on the same monitor), wait for the save to complete;
 - the guest paused once and was resumed once (one STOP, one RESUME),
   it runs and goes on writing records;
 - a fresh QEMU with -incoming defer, on copies of the images the
   overlays now sit on, loads the state; it must run by itself (the
   caller asked for cont before the save took the state), and its
   agent's CHECK must find disks and RAM in agreement, and its writes
   complete.

Every round is judged and logged (STOP/RESUME events with their times,
the guest's pause, the run state loaded, CHECK) before the rounds are
asserted all good, so a failing run shows how many rounds failed, and
how.  Negative control: the last round's state loaded with disks copied
later, after the guest had written more records, must fail that very
check, which proves the check can fail.

What makes the race show, every round: the agent writes its records
back to back (no pause between them), so that any run of the guest
between the disk snapshots and the state completes a record the disks
do not have; and 2 GiB of guest RAM make the save's setup before it
takes the state (populating RAM for write tracking, the RAM bitmaps)
take several milliseconds more than QEMU's way from the migrate answer
to the cont, so that the cont comes first most of the time.  (In
CI, 2 of 10 conts came after the capture; before patch 17, those
rounds loaded paused.)  Without the fix, under TCG on two cores,
every round stopped and resumed the guest twice, and 28 of 30 rounds
(three runs) failed the CHECK.

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_start_instant.py
"""

import asyncio
import os
import subprocess
import time

from avocado import skipUnless
from qemu.qmp import QMPError

from vmsnap import state
from vmsnaptest import guest
from vmsnaptest.vm import VM

from test_drain import GuestTest, newest_record
from test_vmstate_node import (DIRTY_MEM, DIRTY_RATE, NEG_AHEAD,
                               SAVE_TIMEOUT, VMStateNode, event_time)

ROUNDS = 10
GUEST_MEM = 2048        # MiB: a longer setup before the save takes the state
WRITE_INTERVAL_MS = 0   # the agent's records back to back
TERMINAL = ('completed', 'failed', 'cancelled')


class StartInstant(GuestTest):
    """stop, disk snapshots, background snapshot, cont at once; 10 times."""

    timeout = 300
    TARGETS = ['/dev/vda', '/dev/vdb']
    # The guest, and the restored VMs, which must have the same RAM size
    guest_mem = GUEST_MEM
    write_interval_ms = WRITE_INTERVAL_MS
    iothread = False

    # ---- helpers ------------------------------------------------------

    def boot_writer(self):
        disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                 guest.make_data_disk(self.path('d1.raw'), 8, fmt='raw')]
        vm = self.vm('src', disks, self.TARGETS, mem=self.guest_mem,
                     mem_mib=DIRTY_MEM, dirty_mibs=DIRTY_RATE,
                     write_interval_ms=self.write_interval_ms,
                     iothread=self.iothread)
        vm.wait_records(50, timeout=60)
        vm.cmd('migrate-set-capabilities', capabilities=[
            {'capability': c, 'state': True}
            for c in ('mapped-ram', 'background-snapshot', 'events')])
        # The guest's active layers: node names and files.
        self.top = [(f'disk{i}', d) for i, d in enumerate(disks)]
        return vm

    def add_state_node(self, vm, rnd):
        """A raw image of query-vmstate-size's size, as node vmstate<rnd>."""
        size = vm.cmd('query-vmstate-size')['total']
        path = self.path(f'vmstate{rnd}.raw')
        subprocess.run([guest.qemu_img(), 'create', '-q', '-f', 'raw', path,
                        str(size)], check=True)
        node = f'vmstate{rnd}'
        vm.cmd('blockdev-add', driver='raw', **{'node-name': node},
               file={'driver': 'file', 'filename': path})
        return node, path

    @staticmethod
    def del_node(vm, node, timeout=5.0):
        """blockdev-del, retried while the ended save still holds it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                vm.cmd('blockdev-del', **{'node-name': node})
                return
            except QMPError as err:
                if ('in use' not in str(err) and 'busy' not in str(err)) \
                        or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def snapshot_actions(self, rnd):
        """Transaction actions putting a new overlay on each disk."""
        actions, new_top = [], []
        for i, (node, _) in enumerate(self.top):
            overlay = self.path(f'd{i}-r{rnd}.qcow2')
            new_node = f'disk{i}-r{rnd}'
            actions.append({'type': 'blockdev-snapshot-sync', 'data': {
                'node-name': node, 'snapshot-file': overlay,
                'snapshot-node-name': new_node, 'format': 'qcow2'}})
            new_top.append((new_node, overlay))
        return actions, new_top

    def take_events(self, vm):
        """The events pulled so far and those still queued; cleared."""
        events = vm.events + vm.qmp.get_events(wait=False)
        vm.events = []
        vm.qmp.clear_events()
        return events

    def on_disk(self, image, tag):
        """Newest record on an image (of any chain), flattened to raw."""
        flat = self.path(f'{tag}-flat.raw')
        subprocess.run([guest.qemu_img(), 'convert', '-q', '-O', 'raw',
                        image, flat], check=True)
        try:
            return newest_record(flat)[1]
        finally:
            os.unlink(flat)

    def restore(self, name, disks, state_file):
        """A fresh QEMU on disks loads state_file: (VM, run state loaded).

        A paused VM is continued, so that its agent can answer.
        """
        vm = VM(name, self.sockdir, self.logdir, disks, self.TARGETS,
                n_qmp=2, mem=self.guest_mem, mem_mib=DIRTY_MEM,
                dirty_mibs=DIRTY_RATE,
                write_interval_ms=self.write_interval_ms,
                iothread=self.iothread,
                extra_args=['-incoming', 'defer'])
        self.vms.append(vm)
        vm.launch()
        result = asyncio.run(state.load_state(
            vm.qmp_socks[1], file=state_file,
            log=lambda m: self.log.debug('load: %s', m)))
        self.assertTrue(result.ok, f'load failed: {result.error}; '
                        f'{vm.diagnostics()}')
        if result.vm_status == 'paused':
            vm.cmd('cont')
        vm.agent.wait_ready(timeout=60)
        return vm, result.vm_status

    # ---- one round ----------------------------------------------------

    def save_round(self, vm, rnd):
        """stop, disk snapshots, migrate, cont at once; what happened.

        Returns a dict: the record the guest was at before the stop, the
        frozen images (the disks at the snapshots), the state file, the
        save's events and their summary, and what is wrong with it.
        """
        node, state_file = self.add_state_node(vm, rnd)
        actions, new_top = self.snapshot_actions(rnd)
        frozen = [f for _, f in self.top]
        channels = [{'channel-type': 'main',
                     'addr': {'transport': 'block-node', 'node-name': node}}]
        self.take_events(vm)
        _, _, lc = vm.mark(f'round{rnd}-before-stop')
        # The sequence under test: nothing in between, cont at once.
        vm.cmd('stop')
        vm.cmd('transaction', actions=actions)
        vm.cmd('migrate', channels=channels)
        vm.cmd('cont')
        t_cont = time.time()
        self.top = new_top

        try:
            ev = vm.wait_event('MIGRATION', timeout=SAVE_TIMEOUT,
                               match=lambda d: d['status'] in TERMINAL)
        except TimeoutError:
            if vm.proc.poll() is not None:
                with open(vm.qemu_log, encoding='utf-8',
                          errors='replace') as f:
                    last = f.read().strip().splitlines()[-1:]
                self.fail(f'round {rnd}: QEMU died during the save '
                          f'(exit {vm.proc.returncode}): {last}')
            path = VMStateNode.backtrace(self, vm)
            self.fail(f'round {rnd}: the save did not end within '
                      f'{SAVE_TIMEOUT} s ({vm.cmd("query-migrate")}); QEMU '
                      f'backtraces in {path}')
        info = vm.cmd('query-migrate')
        self.assertEqual(ev['data']['status'], 'completed',
                         f'round {rnd}: the save ended {ev["data"]["status"]}'
                         f': {info.get("error-desc")}; {vm.diagnostics()}')
        self.del_node(vm, node)
        run_state = vm.cmd('query-status')['status']
        events = [e for e in self.take_events(vm)
                  if e['event'] in ('STOP', 'RESUME', 'MIGRATION')]

        # The save's events, relative to our stop, and when the answer to
        # cont was back (host clock, as QEMU's timestamps).
        t0 = event_time(next(e for e in events if e['event'] == 'STOP'))
        seq = [(e['event'] if e['event'] != 'MIGRATION'
                else e['data']['status'], event_time(e)) for e in events]
        seq.append(('cont-answered', t_cont))
        seq.sort(key=lambda x: x[1])
        stops = [e for e in events if e['event'] in ('STOP', 'RESUME')]
        pause_ms, stopped = 0.0, None
        for e in stops:
            if e['event'] == 'STOP' and stopped is None:
                stopped = event_time(e)
            elif e['event'] == 'RESUME' and stopped is not None:
                pause_ms += (event_time(e) - stopped) * 1000
                stopped = None
        r = {'round': rnd, 'lc': lc, 'frozen': frozen, 'state': state_file,
             'events': ' '.join(f'{n}@{(t - t0) * 1000:.1f}'
                                for n, t in seq),
             'stop_resume': [e['event'] for e in stops],
             'pause_ms': pause_ms, 'setup_ms': info.get('setup-time'),
             'save_ms': info.get('total-time'), 'problems': []}
        if r['stop_resume'] != ['STOP', 'RESUME']:
            r['problems'].append(f'paused and resumed {r["stop_resume"]}, '
                                 'not once')
        if run_state != 'running':
            r['problems'].append(f'source {run_state} after the save')

        # The source runs on and writes records.
        vm.wait_records(lc + 20, timeout=30)
        return r

    def check_round(self, r):
        """Load the round's state on copies of its frozen images."""
        rnd = r['round']
        copies = self.copy_images(r['frozen'], f'r{rnd}')
        # On the host: the raw disk's chain holds every record the guest
        # had completed before the stop.
        r['on_disk'] = self.on_disk(copies[1], f'r{rnd}')
        if r['on_disk'] < r['lc']:
            r['problems'].append(f'disk snapshots at record {r["on_disk"]}, '
                                 f'before the stop the guest was at {r["lc"]}')
        restored, loaded = self.restore(f'restored{rnd}', copies, r['state'])
        r['loaded'] = loaded
        if loaded != 'running':
            r['problems'].append(f'loaded {loaded}, not running')
        try:
            seq = restored.agent.check()
            r['check'] = f'OK {seq}'
            # The restored guest's writes complete.
            restored.wait_records(seq + 10, timeout=30)
        except AssertionError as err:
            r['check'] = str(err)
            r['problems'].append(r['check'])
        restored.shutdown()
        for c in copies:
            os.unlink(c)
        self.log.info('round %d: stop at record %d, disks at %d; events %s; '
                      'STOP/RESUME %d; paused %.1f ms (setup %s ms, save %s '
                      'ms); loaded %s; CHECK %s', rnd, r['lc'], r['on_disk'],
                      r['events'], len(r['stop_resume']), r['pause_ms'],
                      r['setup_ms'], r['save_ms'], loaded, r['check'])

    def negative_control(self, vm, r):
        """r's state with the disks copied later must fail the check."""
        vm.wait_records(r['on_disk'] + NEG_AHEAD + 1, timeout=60)
        _, _, lc_later = vm.mark('later-before-stop')
        vm.cmd('stop')
        later = self.copy_images([f for _, f in self.top], 'later')
        vm.cmd('cont')
        self.assertGreaterEqual(lc_later, r['on_disk'] + NEG_AHEAD)
        wrong, _ = self.restore('wrong-disks', later, r['state'])
        with self.assertRaises(AssertionError,
                               msg='the state loaded with later disks '
                               'passed the check') as caught:
            wrong.agent.check()
        reason = str(caught.exception)
        self.log.info('negative control (disks at record %d, the state of '
                      'round %d, whose disks were at %d): %s', lc_later,
                      r['round'], r['on_disk'], reason)
        # Caught before the restored guest caught up ('newer'), or after
        # it wrote over a later record's slot ('missing').
        self.assertRegex(reason, 'disk newer than RAM|is missing')
        wrong.shutdown()

    # ---- the test -----------------------------------------------------

    def test_cont_right_after_migrate(self):
        vm = self.boot_writer()
        rounds = []
        for rnd in range(1, ROUNDS + 1):
            r = self.save_round(vm, rnd)
            self.check_round(r)
            rounds.append(r)
            if rnd < ROUNDS:
                os.unlink(r['state'])

        # The source's disks (ROUNDS overlays deep now) agree with its RAM.
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        self.negative_control(vm, rounds[-1])
        vm.shutdown()
        os.unlink(rounds[-1]['state'])

        failed = [r for r in rounds if r['problems']]
        self.log.info('%d of %d rounds failed, %d with CHECK failing; '
                      'pauses %s ms', len(failed), ROUNDS,
                      sum(not r['check'].startswith('OK') for r in rounds),
                      ', '.join(f'{r["pause_ms"]:.1f}' for r in rounds))
        if failed:
            self.fail(f'{len(failed)} of {ROUNDS} rounds failed:\n' +
                      '\n'.join(f'round {r["round"]}: '
                                 f'{"; ".join(r["problems"])} (events '
                                 f'{r["events"]})' for r in failed))


class StartInstantIOThread(StartInstant):
    """The same, with both virtio-blk devices in an IOThread.

    vm_start() moves each disk back into the IOThread, and that
    AioContext change drains every node while the save's migration
    thread writes RAM into its target.  Before the channel held its own
    requests in drained sections, a write could start between the
    drain's poll and its idle check, and QEMU aborted in
    bdrv_drain_assert_idle() (a few rounds in a hundred).

    Known flaky (QEMU's own flaky tests are skipped the same way, unless
    QEMU_TEST_FLAKY_TESTS is set): after a save that completed, the
    source guest's records sometimes stop, its vCPU idle and the
    IOThread waiting, as if a virtio-blk request or its completion was
    lost; 5 of 15 runs of 10 rounds on 2 December, also without the
    patches of that day.  wait_records() writes the QEMU threads'
    backtraces next to the log when it happens.
    """

    iothread = True

    @skipUnless(os.environ.get('VMSNAP_FLAKY_TESTS'),
                'flaky: the guest\'s disk I/O stops after a completed save '
                'in about 1 run in 3 (README, "Known problems"); set '
                'VMSNAP_FLAKY_TESTS=1 to run it')
    def test_cont_right_after_migrate(self):
        super().test_cont_right_after_migrate()
