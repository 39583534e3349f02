"""Guest-level tests of snapshot-group: disks and VM state at one instant.

The test guest's agent writes numbered, checksummed records to two
disks (a qcow2 and a raw image) and keeps memory changing.  One
snapshot-group takes both disks and the VM state into a raw block node
while the guest runs, each disk its own way, as a backup tool would:

 - the qcow2 disk as an internal snapshot (at the start instant) or an
   external overlay (at the end instant);
 - the raw disk drained, for a snapshot of the storage underneath: the
   test copies its image on the host while the group's drain holds the
   guest's requests, then ends the drain, as LVM or Ceph would be asked
   to snapshot the volume.

A third test does the start-instant case through the wrapper users run,
``vmsnap group create``, whose --storage-command copies the raw image
while the drain holds and which ends the drain itself; others delete
groups with ``vmsnap group delete`` and load one into a fresh QEMU with
``vmsnap group load``, which refuses a disk from after the instant.

LiveInternalSnapshot is the proposal's case 4, a live internal
snapshot: both disks internal and the VM state inside the first one,
loaded in place and into a fresh QEMU (see its docstring).

The restore is a fresh QEMU (-incoming defer) on the disks as the
group took them (the internal snapshot converted to an image, or the
image under the overlay; the host copy) that loads the state.  It
must run by itself, and its agent's CHECK must find disks and RAM in
agreement: any request the drain held and the state lost, or any write
after the instant on one disk and not the other, fails it.  The
negative control loads the same state with the raw disk copied later
and must fail that check.

Run with:

    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/guest/test_snapshot_group.py
"""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time

from vmsnap import state
from vmsnaptest import guest
from vmsnaptest.vm import VM

from test_drain import GuestTest
from test_start_instant import StartInstant
from test_vmstate_node import DIRTY_MEM, DIRTY_RATE, NEG_AHEAD, SAVE_TIMEOUT

GUEST_MEM = 512         # MiB


class SnapshotGroupBase(GuestTest):
    """What the tests of snapshot-group share: no test of its own."""

    timeout = 300
    TARGETS = ['/dev/vda', '/dev/vdb']

    # The state node and the restore are the start-instant test's
    guest_mem = GUEST_MEM
    write_interval_ms = None        # the agent's default
    iothread = False
    add_state_node = StartInstant.add_state_node
    del_node = staticmethod(StartInstant.del_node)
    restore = StartInstant.restore

    def boot_writer(self, n_qmp=1):
        self.disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                      guest.make_data_disk(self.path('d1.raw'), 8,
                                           fmt='raw')]
        vm = self.vm('src', self.disks, self.TARGETS, mem=self.guest_mem,
                     mem_mib=DIRTY_MEM, dirty_mibs=DIRTY_RATE, n_qmp=n_qmp)
        vm.wait_records(50, timeout=60)
        return vm

    def wait_job(self, vm, job_id='group'):
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            job = next(j for j in vm.cmd('query-jobs') if j['id'] == job_id)
            if job['status'] == 'concluded':
                break
            if time.monotonic() > deadline:
                self.fail(f'the group did not end in {SAVE_TIMEOUT} s: '
                          f'{job}; {vm.diagnostics()}')
            time.sleep(0.05)
        vm.cmd('job-dismiss', id=job_id)
        self.assertNotIn('error', job, f'the group failed: {job}; '
                         f'{vm.diagnostics()}')
        return job

    def pause_ms(self, vm):
        """The guest's pause from the STOP and RESUME events so far."""
        events = vm.events + vm.qmp.get_events(wait=False)
        vm.events = []
        vm.qmp.clear_events()
        stops = [e for e in events if e['event'] in ('STOP', 'RESUME')]
        self.assertEqual([e['event'] for e in stops], ['STOP', 'RESUME'],
                         'the guest did not pause exactly once')
        t = [e['timestamp']['seconds'] + e['timestamp']['microseconds'] / 1e6
             for e in stops]
        return (t[1] - t[0]) * 1000

    def take_group(self, vm, tag, instant, d0_action):
        """One group of both disks and the state, disk1 drained and disk0
        with @d0_action (internal or external); the disks as it took them
        (images to restore from) and the state file."""
        node, state_file = self.add_state_node(vm, tag)
        disks = [{'node-name': 'disk1', 'action': 'drain'}]
        if d0_action == 'internal':
            disks.append({'node-name': 'disk0', 'action': 'internal'})
        else:
            overlay = self.path('d0-overlay.qcow2')
            subprocess.run([guest.qemu_img(), 'create', '-q', '-f', 'qcow2',
                            overlay, '8M'], check=True)
            vm.cmd('blockdev-add', driver='qcow2',
                   **{'node-name': 'overlay0'}, backing=None,
                   file={'driver': 'file', 'filename': overlay})
            disks.append({'node-name': 'disk0', 'action': 'external',
                          'overlay': 'overlay0'})
        vm.qmp.clear_events()
        vm.events = []
        _, _, lc = vm.mark(f'{tag}-before')
        vm.cmd('snapshot-group', **{'job-id': 'group'}, tag=tag, disks=disks,
               vmstate={'target': 'block-node', 'node-name': node},
               instant=instant, **{'drain-timeout': 120})
        job = self.wait_job(vm)
        pause = self.pause_ms(vm)

        # The storage snapshot of the drained disk, while the drain holds
        drains = vm.cmd('query-block-drains')
        self.assertEqual([(d['id'], d['nodes']) for d in drains],
                         [(tag, ['disk1'])])
        _, ticks1, _ = vm.mark(f'{tag}-drained')
        copy_d1 = self.copy_images([self.disks[1]], tag)[0]
        time.sleep(0.5)     # storage snapshots take their time
        _, ticks2, _ = vm.mark(f'{tag}-copied')
        self.assertGreater(ticks2, ticks1, 'the guest did not run while '
                           'its disk was drained')
        vm.cmd('block-drain-end', id=tag)
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        vm.wait_records(lc + 20, timeout=60)
        self.del_node(vm, node)

        if d0_action == 'internal':
            d0 = self.path(f'{tag}-d0.qcow2')
            subprocess.run([guest.qemu_img(), 'convert', '-U', '-q',
                            '-l', f'snapshot.name={tag}', '-O', 'qcow2',
                            self.disks[0], d0], check=True)
        else:
            d0 = self.copy_images([self.disks[0]], tag)[0]
        self.log.info('%s instant, disk0 %s: guest paused %.1f ms; %d bytes '
                      'of state written', instant, d0_action, pause,
                      job['current-progress'])
        return [d0, copy_d1], state_file, lc

    def add_overlay(self, vm, name, backing_file=None):
        """A new qcow2 image @name.qcow2 as node @name, with no backing
        node yet (for an external action); @backing_file, a raw image,
        into its header."""
        path = self.path(f'{name}.qcow2')
        backing = ['-b', backing_file, '-F', 'raw'] if backing_file else []
        subprocess.run([guest.qemu_img(), 'create', '-q', '-f', 'qcow2',
                        *backing, path, '8M'], check=True)
        vm.cmd('blockdev-add', driver='qcow2', **{'node-name': name},
               backing=None, file={'driver': 'file', 'filename': path})
        return path

    def create(self, vm, tag, disks, state_file):
        """vmsnap group create of @disks (NODE=ACTION) with the state
        into @state_file, which must succeed: its JSON."""
        args = ['create', '--tag', tag, '--state-file', state_file]
        for d in disks:
            args += ['--disk', d]
        rc, created = self.wrapper(vm, *args)
        self.assertEqual((rc, created['ok']), (0, True), created)
        return created

    def wrapper(self, vm, *args):
        """vmsnap group ARGS --json on the second QMP monitor: its JSON."""
        argv = [sys.executable, '-m', 'vmsnap', 'group', *args,
                '--qmp', vm.qmp_socks[1], '--json']
        env = dict(os.environ, PYTHONPATH=str(guest.REPO / 'python'))
        out = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             timeout=SAVE_TIMEOUT, check=False)
        self.log.info('vmsnap group %s:\n%s', ' '.join(args), out.stdout)
        lines = [line for line in out.stdout.splitlines()
                 if line.startswith(('{', '['))]
        self.assertTrue(lines, out.stdout)
        return out.returncode, json.loads(lines[-1])

    def check_restore(self, name, disks, state_file):
        restored, loaded = self.restore(name, disks, state_file)
        self.assertEqual(loaded, 'running')
        try:
            seq = restored.agent.check()
        except AssertionError as err:
            self.fail(f'{name}: {err}')
        restored.wait_records(seq + 10, timeout=30)
        restored.shutdown()
        return seq

    def assert_check_fails(self, vm):
        """The negative control: the agent's CHECK must fail."""
        with self.assertRaises(AssertionError,
                               msg='the state loaded with a later disk '
                               'passed the check') as caught:
            vm.agent.check()
        self.log.info('negative control: %s', caught.exception)

    def negative_control(self, vm, disks, state_file, lc):
        vm.wait_records(lc + NEG_AHEAD + 20, timeout=60)
        vm.cmd('stop')
        later = self.copy_images([self.disks[1]], 'later')[0]
        vm.cmd('cont')
        wrong, _ = self.restore('wrong-disks', [disks[0], later], state_file)
        self.assert_check_fails(wrong)
        wrong.shutdown()

    def run_case(self, instant, d0_action, negative=False):
        vm = self.boot_writer()
        disks, state_file, lc = self.take_group(vm, f'group-{instant}',
                                                instant, d0_action)
        seq = self.check_restore(f'restored-{instant}', disks, state_file)
        self.log.info('%s instant: restored at record %d (the group began '
                      'at %d)', instant, seq, lc)
        self.assertGreaterEqual(seq, lc)
        if negative:
            self.negative_control(vm, disks, state_file, lc)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()
        for f in disks + [state_file]:
            os.unlink(f)



class SnapshotGroup(SnapshotGroupBase):
    """
    Internal/external and drained disks with the state in a block node, at
    one instant: the proposal's cases 1 (external), 2 (internal) and 3
    (drained, a copy taken while the drain holds), mixed in one group, at
    both instants.  Restored into a fresh QEMU, as a block-node state is.
    """

    def test_start_internal_and_drained(self):
        self.run_case('start', 'internal', negative=True)

    def test_start_external_and_drained(self):
        self.run_case('start', 'external')

    def test_end_internal_and_drained(self):
        self.run_case('end', 'internal')

    def test_end_external_and_drained(self):
        self.run_case('end', 'external', negative=True)

    def test_wrapper_start_internal_and_drained(self):
        vm = self.boot_writer(n_qmp=2)
        tag = 'wrapped'
        state_file = self.path('wrapped-state.raw')
        copy_d1 = self.path('wrapped-d1.raw')
        _, _, lc = vm.mark('wrapped-before')
        argv = [sys.executable, '-m', 'vmsnap', 'group', 'create',
                '--qmp', vm.qmp_socks[1], '--tag', tag,
                '--disk', 'disk0=internal', '--disk', 'disk1=drain',
                '--state-file', state_file, '--json', '--storage-command',
                f'cp --reflink=auto {self.disks[1]} {copy_d1}']
        env = dict(os.environ, PYTHONPATH=str(guest.REPO / 'python'))
        out = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             timeout=SAVE_TIMEOUT, check=False)
        self.log.info('vmsnap group create:\n%s', out.stdout)
        self.assertEqual(out.returncode, 0, out.stdout)
        result = json.loads([line for line in out.stdout.splitlines()
                             if line.startswith('{')][-1])
        self.assertTrue(result['ok'])
        self.assertIsNotNone(result['drain_held_ms'])
        # The wrapper ended the drain; the guest runs on
        self.assertEqual(vm.cmd('query-block-drains'), [])
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        vm.wait_records(lc + 20, timeout=60)
        self.log.info('wrapper: guest paused %.1f ms, disk held %d ms, '
                      '%d bytes of state', result['pause_ms'],
                      result['drain_held_ms'], result['state_bytes'])

        # The state records its group: the list finds out what it took
        argv = [sys.executable, '-m', 'vmsnap', 'group', 'list', '--qmp',
                vm.qmp_socks[1], '--state-file', state_file, '--json']
        out = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             timeout=60, check=False)
        self.log.info('vmsnap group list:\n%s', out.stdout)
        self.assertEqual(out.returncode, 0, out.stdout)
        listed = json.loads(out.stdout.splitlines()[-1])
        self.assertEqual(
            [(g['tag'], g['disks'], g['instant'], g['complete'],
              [(d['node-name'], d['action']) for d in g['recorded_disks']],
              g['missing']) for g in listed],
            [(tag, ['disk0'], 'start', True,
              [('disk0', 'internal'), ('disk1', 'drain')], [])])

        d0 = self.path('wrapped-d0.qcow2')
        subprocess.run([guest.qemu_img(), 'convert', '-U', '-q',
                        '-l', f'snapshot.name={tag}', '-O', 'qcow2',
                        self.disks[0], d0], check=True)
        seq = self.check_restore('restored-wrapped', [d0, copy_d1],
                                 state_file)
        self.assertGreaterEqual(seq, lc)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()
        for f in (d0, copy_d1, state_file):
            os.unlink(f)


    @staticmethod
    def roots(vm):
        return sorted(d['inserted']['node-name']
                      for d in vm.cmd('query-block') if 'inserted' in d)

    @staticmethod
    def backing(vm, node):
        for n in vm.cmd('query-named-block-nodes', flat=True):
            if n['node-name'] == node:
                return next((c['node-name'] for c in n.get('children', [])
                             if c['child'] == 'backing'), None)
        return None

    def test_wrapper_delete_internal_and_external(self):
        """vmsnap group delete of two groups with their states in files:
        group a took disk0 internal and put overlay ov-a on disk1, group
        b then put ov-b on ov-a.  Deleting a merges ov-a, now under ov-b,
        into disk1; deleting b merges ov-b, the active layer, into what
        is under it now (disk1, not the ov-a it recorded).  Each
        state no longer loads, the snapshot is gone, and the guest, which
        writes throughout, passes its own check afterwards."""
        vm = self.boot_writer(n_qmp=2)
        files = []
        for tag, disks in (('a', ['disk0=internal', 'disk1=external:ov-a']),
                           ('b', ['ov-a=external:ov-b'])):
            files.append(self.add_overlay(vm, f'ov-{tag}'))
            state_file = self.path(f'{tag}-state.raw')
            files.append(state_file)
            self.create(vm, tag, disks, state_file)
            _, _, lc = vm.mark(f'{tag}-taken')
            vm.wait_records(lc + 10, timeout=60)
        self.assertEqual(self.roots(vm), ['disk0', 'ov-b'])
        self.assertEqual(self.backing(vm, 'ov-b'), 'ov-a')
        used = os.stat(files[1]).st_blocks

        rc, deleted = self.wrapper(vm, 'delete', '--tag', 'a',
                                   '--state-file', files[1])
        self.assertEqual((rc, deleted['ok']), (0, True), deleted)
        self.assertEqual(
            [(d['node-name'], d['action']) for d in
             deleted['recorded_disks']],
            [('disk0', 'internal'), ('disk1', 'external')])
        # ov-a is merged away under ov-b; nothing of a is left
        self.assertEqual(self.roots(vm), ['disk0', 'ov-b'])
        self.assertEqual(self.backing(vm, 'ov-b'), 'disk1')
        self.assertEqual(self.wrapper(vm, 'list', '--state-file',
                                      files[1]), (0, []))
        nodes = [n['node-name'] for n in
                 vm.cmd('query-named-block-nodes', flat=True)]
        self.assertNotIn('ov-a', nodes)
        snaps = [sn['name'] for n in vm.cmd('query-named-block-nodes')
                 for sn in n['image'].get('snapshots', [])]
        self.assertEqual(snaps, [])
        self.assertLess(os.stat(files[1]).st_blocks, used // 2,
                        'the state\'s space was not freed')

        # b's overlay is the guest's active layer: merged while it writes
        rc, deleted = self.wrapper(vm, 'delete', '--tag', 'b',
                                   '--state-file', files[3])
        self.assertEqual((rc, deleted['ok']), (0, True), deleted)
        self.assertEqual(self.roots(vm), ['disk0', 'disk1'])
        self.assertEqual(self.wrapper(vm, 'list', '--state-file', files[1],
                                      '--state-file', files[3]), (0, []))
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        _, _, after = vm.mark('deleted')
        vm.wait_records(after + 20, timeout=60)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()
        for f in files:
            os.unlink(f)

    def test_wrapper_load_fresh(self):
        """vmsnap group load into a fresh QEMU (-incoming defer) of a
        group that took disk0 internal and put overlay ov1 on disk1, its
        state in a file.  Both disks are written after the group.  The
        load is refused, with disk0's image left as it was, on the
        overlay (disk1 from after the instant) and without the state.
        The negative control loads the state on disk0 as it is now: its
        check must fail.  Then the wrapper loads the group on disk0 and
        the image under the overlay, reverting disk0 to its snapshot
        first: the guest's own check passes."""
        vm = self.boot_writer(n_qmp=2)
        d0, d1 = self.disks
        ov = self.add_overlay(vm, 'ov1', backing_file=d1)
        state_file = self.path('fresh-state.raw')
        _, _, lc = vm.mark('fresh-before')
        self.create(vm, 'fresh', ['disk0=internal', 'disk1=external:ov1'],
                    state_file)
        vm.wait_records(lc + 30, timeout=60)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        def fresh(name, disks):
            new = VM(name, self.sockdir, self.logdir, disks, self.TARGETS,
                     n_qmp=2, mem=self.guest_mem, mem_mib=DIRTY_MEM,
                     dirty_mibs=DIRTY_RATE, extra_args=['-incoming', 'defer'])
            self.vms.append(new)
            new.launch()
            return new

        # Refused, naming the part, and nothing changed
        before = self.digest(d0)
        wrong = fresh('on-overlay', [d0, ov])
        for args, part in ((['--state-file', state_file], 'disk1 is on'),
                           ([], 'no VM state of group')):
            rc, out = self.wrapper(wrong, 'load', '--tag', 'fresh', *args)
            self.assertEqual((rc, out['ok']), (1, False), out)
            self.assertIn(part, out['error'])
        self.assertEqual(wrong.cmd('query-status')['status'], 'inmigrate')
        wrong.shutdown()
        self.assertEqual(self.digest(d0), before,
                         'a refused load changed disk0')

        # Negative control: disk0 not reverted is later than the RAM
        later = fresh('not-reverted', [self.copy_images([d0], 'later')[0],
                                       self.copy_images([d1], 'base')[0]])
        result = asyncio.run(state.load_state(
            later.qmp_socks[1], file=state_file,
            log=lambda m: self.log.debug('load: %s', m)))
        self.assertTrue(result.ok, result.error)
        later.agent.wait_ready(timeout=60)
        self.assert_check_fails(later)
        later.shutdown()

        restored = fresh('restored-fresh', [d0, d1])
        rc, out = self.wrapper(restored, 'load', '--tag', 'fresh',
                               '--state-file', state_file)
        self.assertEqual((rc, out['ok']), (0, True), out)
        self.assertEqual((out['loaded'], out['reverted'], out['vm_status']),
                         ('fresh QEMU', ['disk0'], 'running'))
        restored.agent.wait_ready(timeout=60)
        seq = restored.agent.check()
        self.log.info('loaded by the wrapper: restored at record %d (the '
                      'group began at %d)', seq, lc)
        self.assertGreaterEqual(seq, lc)
        restored.wait_records(seq + 10, timeout=30)
        self.assert_no_agent_errors(restored)
        restored.shutdown()
        for f in (ov, state_file):
            os.unlink(f)

    @staticmethod
    def digest(path):
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()



class LiveInternalSnapshot(SnapshotGroupBase):
    """The proposal's case 4: every disk internal, the state inside too.

    One group takes both qcow2 disks as internal snapshots, the VM state
    in the first one's VM state area, as savevm would but with the guest
    running while its state is saved: at the end instant, or at the
    start, where the state is moved into the snapshot afterwards.  It is
    loaded back in place (snapshot-load in the running QEMU) and into a
    fresh QEMU started with -loadvm; each time the agent's CHECK must
    find the disks and RAM in agreement.  The negative control loads
    the first disk and the state but leaves the second disk later, and
    must fail that check.  HMP's delvm deletes it from both disks, and
    both this build's qemu-img and the distribution's find the images
    clean.
    """

    def boot_writer(self, n_qmp=1):
        self.disks = [guest.make_data_disk(self.path('d0.qcow2'), 8),
                      guest.make_data_disk(self.path('d1.qcow2'), 8)]
        vm = self.vm('src', self.disks, self.TARGETS, mem=self.guest_mem,
                     mem_mib=DIRTY_MEM, dirty_mibs=DIRTY_RATE, n_qmp=n_qmp)
        vm.wait_records(50, timeout=60)
        return vm

    def load_in_place(self, vm, tag, devices):
        vm.cmd('snapshot-load', **{'job-id': 'load'}, tag=tag,
               vmstate='disk0', devices=devices)
        self.wait_job(vm, 'load')
        self.assertEqual(vm.cmd('query-status')['status'], 'running')

    def check_images(self):
        for qemu_img in (guest.qemu_img(), '/usr/bin/qemu-img'):
            for disk in self.disks:
                out = subprocess.run([qemu_img, 'check', disk],
                                     capture_output=True, text=True)
                self.assertEqual(out.returncode, 0,
                                 f'{qemu_img} check {disk}: {out.stdout}')

    def test_end_live_internal(self):
        self.run_live_internal('end')

    def test_start_live_internal(self):
        self.run_live_internal('start')

    def run_live_internal(self, instant):
        vm = self.boot_writer()
        tag = 'live'
        vm.qmp.clear_events()
        vm.events = []
        _, _, lc = vm.mark('live-before')
        vm.cmd('snapshot-group', **{'job-id': 'group'}, tag=tag,
               disks=[{'node-name': 'disk0', 'action': 'internal'},
                      {'node-name': 'disk1', 'action': 'internal'}],
               vmstate={'target': 'internal', 'node-name': 'disk0'},
               instant=instant)
        job = self.wait_job(vm)
        pause = self.pause_ms(vm)
        _, _, lc_after = vm.mark('live-after')
        sizes = {n['node-name']: [s['vm-state-size'] for s in
                                  n['image'].get('snapshots', [])]
                 for n in vm.cmd('query-named-block-nodes')
                 if n['node-name'] in ('disk0', 'disk1')}
        self.log.info('%s instant, state in disk0: guest paused %.1f ms; '
                      '%d bytes of state; snapshot VM sizes %s', instant,
                      pause, job['current-progress'], sizes)
        self.assertGreater(sizes['disk0'][0], 0)
        self.assertEqual(sizes['disk1'], [0])

        # In place: the guest ran on; the load takes it back
        vm.wait_records(lc_after + NEG_AHEAD, timeout=60)
        self.load_in_place(vm, tag, ['disk0', 'disk1'])
        seq = self.assert_live_check(vm)
        self.log.info('%s instant, loaded in place: at record %d (group '
                      'began at %d, ended at %d)', instant, seq, lc, lc_after)
        self.assertGreaterEqual(seq, lc)
        self.assertLess(seq, lc_after + NEG_AHEAD)

        # Negative control: disk1 stays later than the state and disk0
        vm.wait_records(seq + NEG_AHEAD, timeout=60)
        self.load_in_place(vm, tag, ['disk0'])
        self.assert_check_fails(vm)
        vm.shutdown()

        # A fresh QEMU on the same images
        fresh = self.vm('fresh', self.disks, self.TARGETS, mode='run',
                        mem=self.guest_mem, mem_mib=DIRTY_MEM,
                        dirty_mibs=DIRTY_RATE, extra_args=['-loadvm', tag])
        seq2 = self.assert_live_check(fresh)
        self.assertGreaterEqual(seq2, lc)
        fresh.wait_records(seq2 + 10, timeout=30)
        self.assert_no_agent_errors(fresh)
        # HMP's delvm takes it too, from every disk
        out = fresh.cmd('human-monitor-command',
                        **{'command-line': f'delvm {tag}'})
        self.assertEqual(out.strip(), '')
        left = [s['name'] for n in fresh.cmd('query-named-block-nodes')
                for s in n['image'].get('snapshots', [])]
        self.assertEqual(left, [])
        fresh.shutdown()
        self.check_images()

    def test_wrapper_load_in_place_block_node(self):
        """vmsnap group load in place (snapshot-group-load) of a group
        of both disks internal with its state in a file, at the start
        instant: the guest, which ran on and wrote after the group, is
        taken back and passes its own check.  A group that put an
        overlay on disk1 is refused in place, the guest running on."""
        vm = self.boot_writer(n_qmp=2)
        state_file = self.path('in-place-state.raw')
        _, _, lc = vm.mark('in-place-before')
        self.create(vm, 'in-place', ['disk0=internal', 'disk1=internal'],
                    state_file)
        _, _, lc_after = vm.mark('in-place-after')
        vm.wait_records(lc_after + NEG_AHEAD, timeout=60)
        rc, loaded = self.wrapper(vm, 'load', '--tag', 'in-place',
                                  '--state-file', state_file)
        self.assertEqual((rc, loaded['ok'], loaded['loaded'],
                          loaded['vm_status']),
                         (0, True, 'in place', 'running'), loaded)
        seq = self.assert_live_check(vm)
        self.log.info('loaded in place from a block node: at record %d '
                      '(group began at %d, ended at %d)', seq, lc, lc_after)
        self.assertGreaterEqual(seq, lc)
        self.assertLess(seq, lc_after + NEG_AHEAD)

        overlay = self.add_overlay(vm, 'ov1')
        ext_state = self.path('ext-state.raw')
        self.create(vm, 'ext', ['disk0=internal', 'disk1=external:ov1'],
                    ext_state)
        _, _, before = vm.mark('ext-taken')
        rc, refused = self.wrapper(vm, 'load', '--tag', 'ext',
                                   '--state-file', ext_state)
        self.assertEqual((rc, refused['ok']), (1, False), refused)
        self.assertIn("Disk 'disk1' of snapshot group 'ext' was taken with "
                      "action 'external'", refused['error'])
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        vm.wait_records(before + 20, timeout=60)
        self.assert_live_check(vm)
        self.assert_no_agent_errors(vm)
        vm.shutdown()
        self.check_images()
        for f in (state_file, ext_state, overlay):
            os.unlink(f)

    def create_live(self, vm, tag, instant):
        """vmsnap group create of a live savevm of both disks, the state
        in disk0's snapshot, which must succeed: its JSON, and the
        agent's last records before and after it."""
        _, _, before = vm.mark(f'{tag}-before')
        rc, created = self.wrapper(
            vm, 'create', '--tag', tag, '--disk', 'disk0=internal',
            '--disk', 'disk1=internal', '--state-internal', 'disk0',
            '--instant', instant)
        self.assertEqual(rc, 0, created)
        _, _, after = vm.mark(f'{tag}-after')
        return created, before, after

    def test_wrapper_killed_group(self):
        """QEMU killed during a start-instant live savevm: a QEMU started
        later on the images lists the group as incomplete (its internal
        snapshots are named killed.incomplete), vmsnap group load refuses
        it with the guest running on, and vmsnap group delete removes
        it; then a group of the same tag completes and loads."""
        vm = self.boot_writer(n_qmp=2)
        # Slow enough that the save is still running when QEMU is killed
        vm.cmd('migrate-set-parameters', **{'max-bandwidth': 1 << 20})
        vm.cmd('snapshot-group', **{'job-id': 'group'}, tag='killed',
               disks=[{'node-name': 'disk0', 'action': 'internal'},
                      {'node-name': 'disk1', 'action': 'internal'}],
               vmstate={'target': 'internal', 'node-name': 'disk0'})
        deadline = time.monotonic() + 30
        while vm.cmd('query-migrate').get('status') != 'active':
            self.assertLess(time.monotonic(), deadline, 'no save began')
            time.sleep(0.05)
        vm.shutdown(graceful=False)
        for disk in self.disks:
            # A SIGKILL may leak clusters the save had allocated
            subprocess.run([guest.qemu_img(), 'check', '-q', '-r', 'leaks',
                            disk], check=False)

        fresh = self.vm('fresh', self.disks, self.TARGETS, n_qmp=2,
                        mem=self.guest_mem, mem_mib=DIRTY_MEM,
                        dirty_mibs=DIRTY_RATE)
        rc, listed = self.wrapper(fresh, 'list')
        self.assertEqual(rc, 0)
        self.assertEqual([(g['tag'], g['disks'], sorted(g['unfinished']),
                           g['complete'], g['state_node']) for g in listed],
                         [('killed', [], ['disk0', 'disk1'], False, None)])
        _, _, before = fresh.mark('killed-listed')
        rc, refused = self.wrapper(fresh, 'load', '--tag', 'killed')
        self.assertEqual((rc, refused['ok']), (1, False), refused)
        self.assertIn("group 'killed' did not finish", refused['error'])
        self.assertEqual(fresh.cmd('query-status')['status'], 'running')
        fresh.wait_records(before + 20, timeout=60)
        rc, deleted = self.wrapper(fresh, 'delete', '--tag', 'killed')
        self.assertEqual(rc, 0, deleted)
        rc, listed = self.wrapper(fresh, 'list')
        self.assertEqual(listed, [])

        _, lc, lc_after = self.create_live(fresh, 'killed', 'start')
        fresh.wait_records(lc_after + NEG_AHEAD, timeout=60)
        rc, loaded = self.wrapper(fresh, 'load', '--tag', 'killed')
        self.assertEqual(rc, 0, loaded)
        seq = self.assert_live_check(fresh)
        self.log.info('after the kill: a new group of the tag loaded at '
                      'record %d (began at %d, ended at %d)', seq, lc,
                      lc_after)
        self.assertGreaterEqual(seq, lc)
        self.assertLess(seq, lc_after + NEG_AHEAD)
        fresh.wait_records(seq + 20, timeout=60)
        self.assert_no_agent_errors(fresh)
        fresh.shutdown()
        self.check_images()

    def test_wrapper_live_internal(self):
        """vmsnap group create, list, load and delete of a live savevm,
        in the QEMU that took it and in one started later."""
        vm = self.boot_writer(n_qmp=2)
        created, lc, lc_after = self.create_live(vm, 'wrapped', 'end')
        self.assertGreater(created['state_bytes'], 0)
        rc, listed = self.wrapper(vm, 'list')
        self.assertEqual(rc, 0)
        self.assertEqual([(g['tag'], sorted(g['disks']), g['state_node'])
                          for g in listed],
                         [('wrapped', ['disk0', 'disk1'], 'disk0')])

        vm.wait_records(lc_after + NEG_AHEAD, timeout=60)
        rc, loaded = self.wrapper(vm, 'load', '--tag', 'wrapped')
        self.assertEqual(rc, 0, loaded)
        seq = self.assert_live_check(vm)
        self.log.info('wrapper: guest paused %.1f ms, %d bytes of state; '
                      'loaded at record %d (group began at %d, ended at %d)',
                      created['pause_ms'], created['state_bytes'], seq, lc,
                      lc_after)
        self.assertGreaterEqual(seq, lc)
        self.assertLess(seq, lc_after + NEG_AHEAD)

        rc, refused = self.wrapper(vm, 'load', '--tag', 'nope')
        self.assertEqual((rc, refused['ok']), (1, False))
        vm.wait_records(seq + 20, timeout=60)
        self.assert_no_agent_errors(vm)
        vm.shutdown()

        # The group survives a restart: a QEMU started later on the same
        # images lists it, and loads it into the guest it booted
        fresh = self.vm('fresh', self.disks, self.TARGETS, n_qmp=2,
                        mem=self.guest_mem, mem_mib=DIRTY_MEM,
                        dirty_mibs=DIRTY_RATE)
        rc, relisted = self.wrapper(fresh, 'list')
        self.assertEqual(relisted, listed)
        rc, loaded = self.wrapper(fresh, 'load', '--tag', 'wrapped')
        self.assertEqual(rc, 0, loaded)
        seq2 = self.assert_live_check(fresh)
        self.assertGreaterEqual(seq2, lc)
        self.assertLess(seq2, lc_after + NEG_AHEAD)
        rc, _ = self.wrapper(fresh, 'delete', '--tag', 'wrapped')
        self.assertEqual(rc, 0)
        rc, listed = self.wrapper(fresh, 'list')
        self.assertEqual(listed, [])
        fresh.wait_records(seq2 + 20, timeout=60)
        self.assert_no_agent_errors(fresh)
        fresh.shutdown()
        self.check_images()
