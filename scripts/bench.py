#!/usr/bin/env python3
"""Guest pause of a host storage snapshot (stop/cont against block
drain), and of a VM state save (block-node against upstream's ways).

Boots the vmsnap test guest with a qcow2 data disk on which the agent
writes records (and with memory being dirtied), then takes the same host
snapshot of the image (cp --reflink=auto plus fsync of the copy) several
times in each of two ways, alternating:

  stop-cont  QMP stop, snapshot, cont: what management tools do today.
             The guest pause is RESUME minus STOP in QEMU's event
             timestamps.
  drain      block-drain-begin, snapshot, block-drain-end.  The time
             guest I/O was held is held-ms of BLOCK_DRAIN_END; the vCPUs
             are not paused at all.

For both, the agent's ticker (100 ticks/s) is sampled with MARK just
before and just after the window, so the table shows how many ticks the
guest got against how many wall time allows; ticks lost show the vCPUs
stood still.

Then, on one other running guest (1 GiB by default, memory being
dirtied), it saves the VM state in each of these ways, --state-rounds
times each, alternating:

  ours      block-node mode start (raw image), mode end (raw image),
            mode start into a qcow2 image (vmsnap state.save);
            snapshot-group at the end and at the start instant with the
            disk internal and the state inside it (a live savevm),
            loaded with loadvm; snapshot-group at each instant with the
            disk internal and the state in a raw block node
  by hand   the same disk and state at one instant without the group:
            stop, blockdev-snapshot-internal-sync, migrate with
            background-snapshot into the node, cont at once; and
            Proxmox's order: a precopy into the node with
            pause-before-switchover, the disk snapshot while the guest
            is stopped in pre-switchover, migrate-continue
  upstream  migrate to file: with background-snapshot; to file: with
            mapped-ram, precopy; to file:, plain stream, precopy (both
            precopies leave the source in postmigrate: the time until
            "cont" has it running again counts as pause); HMP savevm
            into the guest's qcow2 disk

and loads each state into a fresh QEMU.  For each it reports the guest
pause (STOP to RESUME events), the total time, bytes written and
allocated per byte of guest RAM, save throughput against the sequential
write speed of the same file system and load throughput against its
sequential read speed, both measured in the same run.  Every precopy
runs with the same downtime-limit (--downtime-ms, 20).

    PYTHONPATH=python:tests/lib $venv/bin/python scripts/bench.py [--rounds 5]
        [--extra-hold-ms 0] [--state-rounds 5] [--state-guest-mem 1024]
        [--skip-drain] [--skip-state] [--json out.json]

Nothing here asserts on timings; the numbers are for reading.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPError

from vmsnap import state
from vmsnaptest import guest
from vmsnaptest.vm import VM

TICKS_PER_S = 100       # the agent ticks every 10 ms


def event_time(ev):
    ts = ev['timestamp']
    return ts['seconds'] + ts['microseconds'] / 1e6


class Bench:
    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.image = os.path.join(tmp, 'data.qcow2')
        self.snap = os.path.join(tmp, 'snap.qcow2')
        self.vm = None

    def boot(self):
        """Start the guest and let it get going; seconds it took to."""
        a = self.args
        guest.make_data_disk(self.image, a.disk_mib)
        self.vm = VM('bench', self.tmp, self.tmp, [self.image], ['/dev/vda'],
                     mem_mib=a.dirty_mem_mib, dirty_mibs=a.dirty_mibs,
                     mem=a.guest_mem)
        self.vm.launch()
        t0 = time.monotonic()
        self.vm.agent.wait_ready()
        # Let the writer and the dirtier get going.
        self.vm.wait_records(100, timeout=60)
        return time.monotonic() - t0

    # ---- the snapshot -----------------------------------------------------

    def host_snapshot(self):
        """The storage snapshot both methods wrap; its duration in ms."""
        t0 = time.monotonic()
        if os.path.exists(self.snap):
            os.unlink(self.snap)
        subprocess.run(['cp', '--reflink=auto', self.image, self.snap],
                       check=True)
        fd = os.open(self.snap, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.args.extra_hold_ms:
            time.sleep(self.args.extra_hold_ms / 1000)
        return (time.monotonic() - t0) * 1000

    def window(self, label, begin, end):
        """MARK, begin(), host snapshot, end(), MARK: what they measure.

        The QMP events of the window are left in self.vm.events.
        """
        vm = self.vm
        vm.events.clear()
        t0, ticks0, lc0 = vm.mark(f'{label}-before', timeout=30)
        c0 = time.monotonic()
        begin()
        c1 = time.monotonic()
        snap_ms = self.host_snapshot()
        c2 = time.monotonic()
        end()
        c3 = time.monotonic()
        t1, ticks1, lc1 = vm.mark(f'{label}-after', timeout=30)
        return {
            'begin_cmd_ms': (c1 - c0) * 1000,
            'end_cmd_ms': (c3 - c2) * 1000,
            'snapshot_ms': snap_ms,
            'window_ms': (t1 - t0) * 1000,
            'ticks': ticks1 - ticks0,
            'ticks_expected': (t1 - t0) * TICKS_PER_S,
            'records': lc1 - lc0,
        }

    def round_stop_cont(self, n):
        vm = self.vm
        measured = self.window(f'stop-{n}', lambda: vm.cmd('stop'),
                               lambda: vm.cmd('cont'))
        stop = vm.wait_event('STOP')
        resume = vm.wait_event('RESUME')
        pause_ms = (event_time(resume) - event_time(stop)) * 1000
        return {
            'method': 'stop-cont', 'round': n,
            'pause_ms': pause_ms,           # vCPUs stopped
            'io_hold_ms': pause_ms,         # and I/O with them
            **measured,
        }

    def round_drain(self, n):
        vm = self.vm
        drain_id = f'bench-{n}'
        measured = self.window(
            f'drain-{n}',
            lambda: vm.cmd('block-drain-begin', id=drain_id,
                           nodes=['disk0'], timeout=60),
            lambda: vm.cmd('block-drain-end', id=drain_id))
        end = vm.wait_event('BLOCK_DRAIN_END', id=drain_id)
        if end['data']['reason'] != 'requested':
            print(f'warning: drain {drain_id} ended by '
                  f'{end["data"]["reason"]}', file=sys.stderr)
        return {
            'method': 'drain', 'round': n,
            'pause_ms': 0.0,                # vCPUs are never stopped
            'io_hold_ms': float(end['data']['held-ms']),
            **measured,
        }

    def run(self):
        rounds = []
        for n in range(1, self.args.rounds + 1):
            # Alternate which goes first, so neither always follows a rest.
            order = ((self.round_stop_cont, self.round_drain) if n % 2
                     else (self.round_drain, self.round_stop_cont))
            for fn in order:
                _, _, lc = self.vm.mark(f'settle-{n}', timeout=30)
                # The guest is writing again.
                self.vm.wait_records(lc + 20, timeout=60)
                time.sleep(self.args.gap_s)
                rounds.append(fn(n))
        return rounds


def summarize(rounds):
    out = {}
    for method in ('stop-cont', 'drain'):
        rs = [r for r in rounds if r['method'] == method]
        s = {}
        for key in ('pause_ms', 'io_hold_ms', 'begin_cmd_ms', 'snapshot_ms',
                    'window_ms', 'ticks', 'ticks_expected'):
            vals = [r[key] for r in rs]
            s[key] = {'median': statistics.median(vals), 'min': min(vals),
                      'max': max(vals)}
        s['ticks_fraction'] = (sum(r['ticks'] for r in rs) /
                               sum(r['ticks_expected'] for r in rs))
        s['ticks_lost'] = sum(r['ticks_expected'] - r['ticks'] for r in rs)
        out[method] = s
    sc, dr = out['stop-cont'], out['drain']
    out['ratios'] = {
        'io_hold_drain_over_pause_stop_cont':
            dr['io_hold_ms']['median'] / sc['pause_ms']['median']
            if sc['pause_ms']['median'] else None,
        'vcpu_pause_drain_over_stop_cont': 0.0,
        'ticks_fraction_stop_cont': sc['ticks_fraction'],
        'ticks_fraction_drain': dr['ticks_fraction'],
    }
    return out


def print_table(rounds, summary, info):
    print(f'\nvmsnap bench: {info["rounds"]} rounds, accel={info["accel"]}, '
          f'guest {info["guest_mem"]} MiB, dirtying {info["dirty_mem_mib"]} '
          f'MiB at {info["dirty_mibs"]} MiB/s, snapshot = cp --reflink=auto '
          f'+ fsync{" + %d ms" % info["extra_hold_ms"] if info["extra_hold_ms"] else ""}')
    hdr = (f'{"method":<10} {"rnd":>3} {"vCPU pause":>11} {"I/O held":>9} '
           f'{"begin cmd":>10} {"snapshot":>9} {"window":>8} '
           f'{"ticks got/expected":>19} {"records":>8}')
    print(hdr)
    print('-' * len(hdr))
    for r in sorted(rounds, key=lambda r: (r['method'] != 'stop-cont',
                                           r['round'])):
        print(f'{r["method"]:<10} {r["round"]:>3} {r["pause_ms"]:>8.1f} ms '
              f'{r["io_hold_ms"]:>6.1f} ms {r["begin_cmd_ms"]:>7.1f} ms '
              f'{r["snapshot_ms"]:>6.1f} ms {r["window_ms"]:>5.0f} ms '
              f'{r["ticks"]:>8d} / {r["ticks_expected"]:>7.1f} '
              f'{r["records"]:>8d}')
    print()
    for m in ('stop-cont', 'drain'):
        s = summary[m]
        print(f'{m:<10} median: vCPU pause {s["pause_ms"]["median"]:.1f} ms, '
              f'I/O held {s["io_hold_ms"]["median"]:.1f} ms, guest got '
              f'{100 * s["ticks_fraction"]:.0f}% of its ticks over the '
              f'windows ({max(0, s["ticks_lost"]):.1f} ticks = '
              f'{max(0, 10 * s["ticks_lost"]):.0f} ms lost in all)')
    ra = summary['ratios']
    ratio = ra['io_hold_drain_over_pause_stop_cont']
    print(f'ratio I/O held (drain) / guest pause (stop-cont), medians: '
          f'{ratio:.2f}' if ratio is not None else 'ratio: n/a')
    print('ratio vCPU pause (drain) / vCPU pause (stop-cont): 0 '
          '(drain never stops the vCPUs)')
    print('"window" is the host time between the MARK answers before and '
          'after; ticks are the agent ticker (10 ms each) over it.')


# ---------------------------------------------------------------------------
# VM state: block-node against the upstream ways of saving it

MIB = 1048576
# (key, label, kind, options): the saves, in the order they run; ours and
# upstream's alternate so that neither always follows the other.
STATE_METHODS = [
    ('bg-file', 'upstream file: background-snapshot', 'file',
     {'bg': True, 'mapped_ram': False}),
    ('node-start-raw', 'ours block-node start, raw', 'node',
     {'mode': 'start', 'fmt': 'raw'}),
    ('mapped-file', 'upstream file: mapped-ram precopy', 'file',
     {'bg': False, 'mapped_ram': True}),
    ('node-end-raw', 'ours block-node end, raw', 'node',
     {'mode': 'end', 'fmt': 'raw'}),
    ('stream-file', 'upstream file: stream precopy', 'file',
     {'bg': False, 'mapped_ram': False}),
    ('node-start-qcow2', 'ours block-node start, qcow2', 'node',
     {'mode': 'start', 'fmt': 'qcow2'}),
    ('savevm', 'upstream HMP savevm (qcow2 disk)', 'savevm', {}),
    ('group-internal', 'ours group end, internal state', 'group',
     {'instant': 'end'}),
    ('group-internal-start', 'ours group start, internal state', 'group',
     {'instant': 'start'}),
    # The disk internal and the state into a raw block node: the same
    # group done by hand and Proxmox's way, against snapshot-group
    ('byhand-start', 'by hand: stop, disk, bg, cont', 'byhand', {}),
    ('group-node-start', 'ours group start, disk+node', 'group-node',
     {'instant': 'start'}),
    ('proxmox-end', 'Proxmox-style: end, disk stopped', 'proxmox', {}),
    ('group-node-end', 'ours group end, disk+node', 'group-node',
     {'instant': 'end'}),
]
# Kinds whose state is in a block node, loaded with migrate-incoming
NODE_KINDS = ('node', 'byhand', 'proxmox', 'group-node')
BASELINE = 'bg-file'    # pause ratios are against this one


def drop_cache(path):
    """fsync path, then drop its pages from the page cache: the next read
    comes from the disk.  Returns the fsync's milliseconds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.monotonic()
        os.fsync(fd)
        sync_ms = (time.monotonic() - t0) * 1000
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return sync_ms


def seq_speeds(directory, mib=256):
    """Sequential write (with fsync) and cold read speed, bytes/s, of
    the file system holding directory."""
    path = os.path.join(directory, 'seq-speed.tmp')
    block = os.urandom(MIB)
    try:
        t0 = time.monotonic()
        with open(path, 'wb', buffering=0) as f:
            for _ in range(mib):
                f.write(block)
            os.fsync(f.fileno())
        write_s = time.monotonic() - t0
        drop_cache(path)
        t0 = time.monotonic()
        with open(path, 'rb', buffering=0) as f:
            while f.read(MIB):
                pass
        read_s = time.monotonic() - t0
    finally:
        os.unlink(path)
    return mib * MIB / write_s, mib * MIB / read_s


def pauses(events):
    """(total ms, count) of the STOP -> RESUME intervals in events."""
    total, count, stopped = 0.0, 0, None
    for ev in events:
        if ev['event'] == 'STOP' and stopped is None:
            stopped = event_time(ev)
        elif ev['event'] == 'RESUME' and stopped is not None:
            total += (event_time(ev) - stopped) * 1000
            count += 1
            stopped = None
    return total, count


class StateBench:
    """Saves the VM state of one running guest in each way, then loads
    each state into a fresh QEMU."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.image = os.path.join(tmp, 'state-disk.qcow2')
        self.vm = None
        self.vms = []

    def vm_kw(self):
        a = self.args
        return dict(mem=a.state_guest_mem, mem_mib=a.dirty_mem_mib,
                    dirty_mibs=a.state_dirty_mibs)

    def boot(self):
        guest.make_data_disk(self.image, self.args.disk_mib)
        # Monitor 0 is the bench's (events), monitor 1 state.py's.
        self.vm = VM('state', self.tmp, self.tmp, [self.image], ['/dev/vda'],
                     n_qmp=2, **self.vm_kw())
        self.vms.append(self.vm)
        self.vm.launch()
        self.vm.agent.wait_ready()
        self.vm.wait_records(100, timeout=60)

    def events(self):
        """The QMP events since the last call."""
        evs = self.vm.events + self.vm.qmp.get_events(wait=False)
        self.vm.events = []
        return evs

    def wait_migration(self, vm, timeout=300.0):
        """MIGRATION events until the migration ends; its status."""
        try:
            ev = vm.wait_event('MIGRATION', timeout, match=lambda d: d[
                'status'] in ('completed', 'failed', 'cancelled'))
        except TimeoutError as err:
            raise RuntimeError(f'migration not finished in {timeout} s; '
                               f'{vm.diagnostics()}') from err
        return ev['data']['status']

    def set_caps(self, vm, **caps):
        # The last migration may still await its clean-up after its
        # "completed" event; QEMU refuses new settings until then.
        deadline = time.monotonic() + 10
        while True:
            try:
                vm.cmd('migrate-set-capabilities', capabilities=[
                    {'capability': k.replace('_', '-'), 'state': v}
                    for k, v in caps.items()])
                return
            except QMPError as err:
                if 'not finalized yet' not in str(err) or \
                        time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ---- saves ------------------------------------------------------------

    def save_node(self, key, mode, fmt):
        path = os.path.join(self.tmp, f'{key}.{fmt}')
        t0 = time.monotonic()
        result = asyncio.run(state.save_state(
            self.vm.qmp_socks[1], file=path, fmt=fmt, create=True,
            mode=mode, downtime_ms=self.args.downtime_ms,
            log=lambda m: None))
        total_s = time.monotonic() - t0
        if not result.ok:
            raise RuntimeError(f'{key}: save failed: {result.error}')
        info = self.vm.cmd('query-migrate')
        return {'path': path, 'fmt': fmt, 'total_s': total_s,
                'downtime_ms': info.get('downtime'),
                'save_ms': info.get('total-time', result.total_ms),
                'written': result.bytes_written,
                'load_bytes': os.stat(path).st_blocks * 512}

    def save_file(self, key, bg, mapped_ram):
        vm = self.vm
        path = os.path.join(self.tmp, f'{key}.state')
        self.set_caps(vm, events=True, background_snapshot=bg,
                      mapped_ram=mapped_ram, pause_before_switchover=False)
        vm.cmd('migrate-set-parameters', **{
            'downtime-limit': self.args.downtime_ms})
        t0 = time.monotonic()
        vm.cmd('migrate', uri=f'file:{path}')
        status = self.wait_migration(vm)
        if status != 'completed':
            raise RuntimeError(f'{key}: migration {status}: '
                               f'{vm.cmd("query-migrate")}')
        if not bg:
            # Precopy to a file is a hand-over: the source is left in
            # postmigrate, its images inactive.  Resuming it is part of
            # the guest's pause.  The "completed" event comes just before
            # the source leaves finish-migrate, when cont is refused.
            deadline = time.monotonic() + 10
            while True:
                try:
                    vm.cmd('cont')
                    break
                except QMPError as err:
                    if 'not finalized yet' not in str(err) or \
                            time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        total_s = time.monotonic() - t0
        info = vm.cmd('query-migrate')
        self.set_caps(vm, background_snapshot=False, mapped_ram=False)
        written = info['ram']['transferred']
        st = os.stat(path)
        return {'path': path, 'fmt': 'file', 'total_s': total_s,
                'downtime_ms': info.get('downtime'),
                'save_ms': info['total-time'], 'written': written,
                'mapped_ram': mapped_ram,
                # mapped-ram loads only the pages present; a stream, all
                'load_bytes': (st.st_blocks * 512 if mapped_ram
                               else st.st_size)}

    def save_savevm(self, name):
        vm = self.vm
        before = os.stat(self.image).st_blocks * 512
        t0 = time.monotonic()
        out = vm.cmd('human-monitor-command',
                     **{'command-line': f'savevm {name}'})
        total_s = time.monotonic() - t0
        if out.strip():
            raise RuntimeError(f'savevm: {out.strip()}')
        snaps = vm.cmd('query-block')[0]['inserted']['image'].get(
            'snapshots', [])
        size = [s for s in snaps if s['name'] == name][0]['vm-state-size']
        return {'path': self.image, 'fmt': 'qcow2', 'snapshot': name,
                'total_s': total_s,
                'save_ms': total_s * 1000, 'written': size,
                'allocated': os.stat(self.image).st_blocks * 512 - before,
                'load_bytes': size}

    def save_group(self, name, instant):
        """A live savevm: snapshot-group at @instant, the disk internal
        with the state inside."""
        vm = self.vm
        before = os.stat(self.image).st_blocks * 512
        vm.cmd('migrate-set-parameters', **{
            'downtime-limit': self.args.downtime_ms})
        t0 = time.monotonic()
        vm.cmd('snapshot-group', **{'job-id': 'bench-group'}, tag=name,
               disks=[{'node-name': 'disk0', 'action': 'internal'}],
               vmstate={'target': 'internal', 'node-name': 'disk0'},
               instant=instant)
        job = self.wait_job('bench-group', name)
        total_s = time.monotonic() - t0
        if 'error' in job:
            raise RuntimeError(f'{name}: {job["error"]}')
        snaps = vm.cmd('query-block')[0]['inserted']['image'].get(
            'snapshots', [])
        size = [s for s in snaps if s['name'] == name][0]['vm-state-size']
        return {'path': self.image, 'fmt': 'qcow2', 'snapshot': name,
                'total_s': total_s, 'save_ms': total_s * 1000,
                'written': size,
                'allocated': os.stat(self.image).st_blocks * 512 - before,
                'load_bytes': size}

    def add_state_node(self, name):
        """A raw image of query-vmstate-size's size as node @name."""
        vm = self.vm
        path = os.path.join(self.tmp, f'{name}.raw')
        size = vm.cmd('query-vmstate-size')['total']
        subprocess.run([guest.qemu_img(), 'create', '-q', '-f', 'raw', path,
                        str(size)], check=True)
        vm.cmd('blockdev-add', **{'driver': 'raw', 'node-name': name,
                                  'file': {'driver': 'file',
                                           'filename': path}})
        return path

    def del_state_node(self, name):
        # The save lets the node go in its clean-up, after it reports
        deadline = time.monotonic() + 10
        while True:
            try:
                self.vm.cmd('blockdev-del', **{'node-name': name})
                return
            except QMPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @staticmethod
    def channels(node):
        return [{'channel-type': 'main',
                 'addr': {'transport': 'block-node', 'node-name': node}}]

    def node_row(self, name, path, t0):
        total_s = time.monotonic() - t0
        info = self.vm.cmd('query-migrate')
        self.del_state_node(name)
        return {'path': path, 'fmt': 'raw', 'total_s': total_s,
                'downtime_ms': info.get('downtime'),
                'save_ms': info['total-time'],
                'written': info['ram']['transferred'],
                'load_bytes': os.stat(path).st_blocks * 512}

    def snapshot_disk(self, name):
        # VM.cmd() takes the command as 'name'
        self.vm.qmp.cmd('blockdev-snapshot-internal-sync', device='disk0',
                        name=name)

    def finish_node_save(self, name, path, t0):
        """Wait for the save into node @name to complete; its row."""
        status = self.wait_migration(self.vm)
        if status != 'completed':
            raise RuntimeError(f'{name}: migration {status}')
        return self.node_row(name, path, t0)

    def save_byhand(self, name):
        """What a tool does by hand for disks and state at one instant:
        stop, the disk's internal snapshot, a background snapshot into
        a block node, cont at once (which waits for the capture)."""
        vm = self.vm
        path = self.add_state_node(name)
        self.set_caps(vm, events=True, background_snapshot=True,
                      mapped_ram=True, pause_before_switchover=False)
        t0 = time.monotonic()
        vm.cmd('stop')
        self.snapshot_disk(name)
        vm.cmd('migrate', channels=self.channels(name))
        vm.cmd('cont')
        row = self.finish_node_save(name, path, t0)
        self.set_caps(vm, background_snapshot=False, mapped_ram=False)
        return row

    def save_proxmox(self, name):
        """Proxmox's order: the state saved until the guest stops for the
        last pass, the disk snapshotted while it is stopped, then on."""
        vm = self.vm
        path = self.add_state_node(name)
        self.set_caps(vm, events=True, background_snapshot=False,
                      mapped_ram=True, pause_before_switchover=True)
        vm.cmd('migrate-set-parameters', **{
            'downtime-limit': self.args.downtime_ms})
        t0 = time.monotonic()
        vm.cmd('migrate', channels=self.channels(name))
        ev = vm.wait_event('MIGRATION', 300, match=lambda d:
                           d['status'] in ('pre-switchover', 'failed'))
        if ev['data']['status'] == 'failed':
            raise RuntimeError(f'{name}: migration failed')
        self.snapshot_disk(name)
        vm.cmd('migrate-continue', state='pre-switchover')
        row = self.finish_node_save(name, path, t0)
        self.set_caps(vm, mapped_ram=False, pause_before_switchover=False)
        return row

    def save_group_node(self, name, instant):
        """snapshot-group: the disk internal, the state into a node."""
        vm = self.vm
        path = self.add_state_node(name)
        vm.cmd('migrate-set-parameters', **{
            'downtime-limit': self.args.downtime_ms})
        t0 = time.monotonic()
        vm.cmd('snapshot-group', **{'job-id': 'bench-group'}, tag=name,
               disks=[{'node-name': 'disk0', 'action': 'internal'}],
               vmstate={'target': 'block-node', 'node-name': name},
               instant=instant)
        job = self.wait_job('bench-group', name)
        row = self.node_row(name, path, t0)
        if 'error' in job:
            raise RuntimeError(f'{name}: {job["error"]}')
        return row

    def wait_job(self, job_id, name):
        """Wait for job @job_id to conclude, dismiss it; its last info."""
        deadline = time.monotonic() + 300
        while True:
            job = next(j for j in self.vm.cmd('query-jobs')
                       if j['id'] == job_id)
            if job['status'] == 'concluded':
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f'{name}: job not done: {job}')
            time.sleep(0.01)
        self.vm.cmd('job-dismiss', id=job_id)
        return job

    def run_saves(self):
        rows = []
        for rnd in range(1, self.args.state_rounds + 1):
            # Every other round in the opposite order: a save does not
            # always follow the same one.
            methods = [m for m in STATE_METHODS
                       if m[0] in self.args.state_methods]
            methods = methods if rnd % 2 else methods[::-1]
            for key, label, kind, opts in methods:
                rows.append(self.save_one(rnd, key, label, kind, opts))
        return rows

    def save_one(self, rnd, key, label, kind, opts):
        _, _, lc = self.vm.mark(f'settle-{key}-{rnd}', timeout=30)
        self.vm.wait_records(lc + 20, timeout=60)
        self.vm.cmd('query-status')     # collect the events so far
        self.events()
        name = f'{key}-{rnd}'
        if kind == 'node':
            row = self.save_node(name, **opts)
        elif kind == 'file':
            row = self.save_file(name, **opts)
        elif kind == 'group':
            row = self.save_group(name, **opts)
        elif kind == 'byhand':
            row = self.save_byhand(name)
        elif kind == 'proxmox':
            row = self.save_proxmox(name)
        elif kind == 'group-node':
            row = self.save_group_node(name, **opts)
        else:
            row = self.save_savevm(name)
        st = self.vm.cmd('query-status')
        if not st['running']:
            raise RuntimeError(f'{name}: the guest is {st["status"]} after '
                               'the save')
        # Catch the RESUME of a guest resumed just now.
        time.sleep(0.1)
        self.vm.cmd('query-status')
        pause_ms, n = pauses(self.events())
        row.update(key=key, round=rnd, label=label, kind=kind,
                   pause_ms=pause_ms, pauses=n)
        row.setdefault('allocated', os.stat(row['path']).st_blocks * 512)
        # QEMU's file: transport does not fsync; block-node and savevm
        # flush.  What is left to sync counts as save time.
        row['sync_ms'] = (drop_cache(row['path'])
                          if kind not in ('savevm', 'group') else 0.0)
        print(f'  round {rnd}: {label}: pause {pause_ms:.1f} ms, '
              f'{row["total_s"]:.2f} s', file=sys.stderr, flush=True)
        return row

    # ---- loads ------------------------------------------------------------

    def load(self, row):
        """Load row's state into a fresh, paused QEMU; milliseconds."""
        key = f'{row["key"]}-{row["round"]}'
        internal = row['kind'] in ('savevm', 'group')
        extra = ['-S'] + ([] if internal else ['-incoming', 'defer'])
        vm = VM(f'load-{key}', self.tmp, self.tmp, [self.image],
                ['/dev/vda'], extra_args=extra, **self.vm_kw())
        self.vms.append(vm)
        drop_cache(row['path'])
        drop_cache(self.image)
        vm.launch()
        try:
            if internal:
                t0 = time.monotonic()
                out = vm.cmd('human-monitor-command',
                             **{'command-line':
                                f'loadvm {row["snapshot"]}'})
                ms = (time.monotonic() - t0) * 1000
                if out.strip():
                    raise RuntimeError(f'loadvm: {out.strip()}')
                return ms
            self.set_caps(vm, events=True,
                          mapped_ram=row['kind'] in NODE_KINDS or
                          row.get('mapped_ram', False))
            if row['kind'] in NODE_KINDS:
                vm.cmd('blockdev-add', **{
                    'driver': row['fmt'], 'node-name': 'vmstate0',
                    'read-only': True,
                    'file': {'driver': 'file', 'filename': row['path']}})
                args = {'channels': [{
                    'channel-type': 'main',
                    'addr': {'transport': 'block-node',
                             'node-name': 'vmstate0', 'offset': 0}}]}
            else:
                args = {'uri': f'file:{row["path"]}'}
            t0 = time.monotonic()
            vm.cmd('migrate-incoming', **args)
            status = self.wait_migration(vm)
            ms = (time.monotonic() - t0) * 1000
            if status != 'completed':
                raise RuntimeError(f'load {key}: {status}; '
                                   f'{vm.diagnostics()}')
            return ms
        finally:
            vm.shutdown()

    def run(self):
        self.seq_write, self.seq_read = seq_speeds(self.tmp)
        self.boot()
        try:
            rows = self.run_saves()
            self.check = self.vm.agent.check()
            self.errors = self.vm.agent_errors()
        finally:
            self.vm.shutdown()
        for row in rows:
            row['load_ms'] = self.load(row)
            if row['kind'] not in ('savevm', 'group'):
                os.unlink(row['path'])
        return rows


def summarize_state(rows, bench):
    """Per-round figures into rows; the medians per method."""
    ram = bench.args.state_guest_mem * MIB
    for r in rows:
        save_s = (r['save_ms'] + r['sync_ms']) / 1000
        r['written_per_ram'] = r['written'] / ram
        r['allocated_per_ram'] = r['allocated'] / ram
        r['save_bps'] = r['written'] / save_s
        r['load_bps'] = r['load_bytes'] / (r['load_ms'] / 1000)
    out = []
    for key, label, _, _ in STATE_METHODS:
        rs = [r for r in rows if r['key'] == key]
        if not rs:
            continue
        m = {'key': key, 'label': label, 'rounds': len(rs),
             'pause_all_ms': [r['pause_ms'] for r in rs]}
        for k in ('pause_ms', 'total_s', 'written_per_ram',
                  'allocated_per_ram', 'save_ms', 'sync_ms', 'save_bps',
                  'load_ms', 'load_bps'):
            m[k] = statistics.median(r[k] for r in rs)
        m['save_vs_seq_write'] = m['save_bps'] / bench.seq_write
        m['load_vs_seq_read'] = m['load_bps'] / bench.seq_read
        out.append(m)
    base = [m for m in out if m['key'] == BASELINE][0]['pause_ms']
    for m in out:
        m['pause_vs_bg'] = m['pause_ms'] / base if base else None
    return out


def print_state_table(rows, bench, info):
    a = bench.args
    print(f'\nvmsnap bench, VM state ({a.state_rounds} rounds, medians): '
          f'accel={info["accel"]}, guest '
          f'{a.state_guest_mem} MiB, dirtying {a.dirty_mem_mib} MiB at '
          f'{a.state_dirty_mibs} MiB/s, downtime-limit {a.downtime_ms} ms '
          f'for every precopy; target file system: sequential write '
          f'{bench.seq_write / MIB:.0f} MiB/s (with fsync), cold read '
          f'{bench.seq_read / MIB:.0f} MiB/s')
    hdr = (f'{"method":<33} {"pause":>7} {"x bg":>6} {"total":>6} '
           f'{"written":>7} {"alloc":>6} {"save":>6} {"sync":>6} '
           f'{"save":>9} {"x wr":>5} {"load":>7} {"load":>9} {"x rd":>5}')
    print(hdr)
    print(f'{"":<33} {"ms":>7} {"":>6} {"s":>6} {"/RAM":>7} {"/RAM":>6} '
          f'{"ms":>6} {"ms":>6} {"MiB/s":>9} {"":>5} {"ms":>7} '
          f'{"MiB/s":>9} {"":>5}')
    print('-' * len(hdr))
    for r in rows:
        pvb = f'{r["pause_vs_bg"]:.2f}' if r['pause_vs_bg'] is not None \
            else 'n/a'
        print(f'{r["label"]:<33} {r["pause_ms"]:>7.1f} {pvb:>6} '
              f'{r["total_s"]:>6.2f} {r["written_per_ram"]:>7.3f} '
              f'{r["allocated_per_ram"]:>6.3f} {r["save_ms"]:>6.0f} '
              f'{r["sync_ms"]:>6.0f} {r["save_bps"] / MIB:>9.0f} '
              f'{r["save_vs_seq_write"]:>5.2f} {r["load_ms"]:>7.0f} '
              f'{r["load_bps"] / MIB:>9.0f} {r["load_vs_seq_read"]:>5.2f}')
    print()
    print('pause per round (ms): ' + '; '.join(
        f'{r["key"]} ' + ' '.join(f'{p:.1f}' for p in r['pause_all_ms'])
        for r in rows))
    print('pause: the guest\'s, STOP to RESUME in QEMU\'s events, summed; '
          'for precopy to file: until "cont" resumed the source left in '
          'postmigrate.  x bg: pause over upstream background-snapshot\'s.')
    print('total: wall time of the whole save as a user runs it (ours: '
          'vmsnap state.save, image creation and node set-up included).')
    print('written: bytes QEMU wrote (query-migrate ram.transferred; '
          'savevm and the group: vm-state-size); alloc: bytes the file '
          'took on disk (st_blocks; savevm and the group: growth of the '
          'disk image).')
    print('group: snapshot-group at the end or start instant, the qcow2 '
          'disk internal with the VM state in it (a live savevm); loaded '
          'with loadvm like savevm; total and save ms: until its job '
          'concluded.')
    print('save ms: QEMU\'s total-time (savevm: the command); sync ms: '
          'fsync of the file afterwards (file: does not sync; block-node '
          'and savevm flush).  save MiB/s = written / (save + sync); '
          'x wr: over the sequential write speed.')
    print('load: a fresh QEMU (-incoming defer -S; savevm: -S and loadvm), '
          'migrate-incoming to completed, page cache dropped first; load '
          'MiB/s = bytes read (mapped-ram: allocated; stream: file size; '
          'savevm: vm-state-size) / load time; x rd: over the cold '
          'sequential read speed.')


class BusyBench:
    """A guest that dirties memory faster than a save can write it: each
    way of saving it, once each per round, with the pause, the traffic
    and the time; precopies that do not end are cancelled."""

    def __init__(self, args, tmp):
        self.args = args
        self.tmp = tmp
        self.vm = None

    def boot(self):
        a = self.args
        disk = os.path.join(self.tmp, 'busy-disk.qcow2')
        guest.make_data_disk(disk, a.disk_mib)
        self.vm = VM('busy', self.tmp, self.tmp, [disk], ['/dev/vda'],
                     n_qmp=2, mem=a.busy_guest_mem, mem_mib=a.busy_dirty_mib,
                     dirty_mibs=8192)
        self.vm.launch()
        self.vm.agent.wait_ready()
        self.vm.wait_records(50, timeout=60)

    def ours(self, mode, max_write):
        path = os.path.join(self.tmp, 'busy.raw')
        result = asyncio.run(state.save_state(
            self.vm.qmp_socks[1], file=path, fmt='raw', create=True,
            mode=mode, downtime_ms=self.args.downtime_ms,
            max_write=max_write, log=lambda m: None))
        os.unlink(path)
        if not result.ok:
            raise RuntimeError(f'busy {mode}: save failed: {result.error}')
        return {'written': result.bytes_written, 'bound':
                result.size['total'], 'passes': result.passes,
                'total_s': result.total_ms / 1000, 'completed': True}

    def upstream(self, limit_s):
        """Upstream mapped-ram precopy to file:, cancelled after limit_s"""
        vm = self.vm
        path = os.path.join(self.tmp, 'busy.state')
        StateBench.set_caps(self, vm, events=True, mapped_ram=True,
                            background_snapshot=False,
                            pause_before_switchover=False)
        vm.cmd('migrate-set-parameters',
               **{'downtime-limit': self.args.downtime_ms})
        t0 = time.monotonic()
        vm.cmd('migrate', uri=f'file:{path}')
        deadline = t0 + limit_s
        while True:
            info = vm.cmd('query-migrate')
            if info['status'] in ('completed', 'failed'):
                break
            if time.monotonic() > deadline:
                vm.cmd('migrate_cancel')
                while vm.cmd('query-migrate')['status'] not in (
                        'cancelled', 'failed'):
                    time.sleep(0.05)
                break
            time.sleep(0.1)
        if info['status'] == 'completed':
            vm.cmd('cont')
        total_s = time.monotonic() - t0
        StateBench.set_caps(self, vm, mapped_ram=False)
        if os.path.exists(path):
            os.unlink(path)
        ram = info.get('ram', {})
        return {'written': ram.get('transferred', 0),
                'bound': self.vm.cmd('query-vmstate-size')['total'],
                'passes': ram.get('dirty-sync-count'),
                'total_s': total_s,
                'completed': info['status'] == 'completed'}

    def run(self):
        a = self.args
        ways = [('ours-end', 'block-node, end, --max-write 2',
                 lambda: self.ours('end', 2.0)),
                ('ours-start', 'block-node, start',
                 lambda: self.ours('start', None)),
                ('upstream-end', f'upstream file: mapped-ram precopy '
                 f'(cancel at {a.busy_limit_s} s)',
                 lambda: self.upstream(a.busy_limit_s))]
        rows = []
        self.boot()
        try:
            for rnd in range(1, a.busy_rounds + 1):
                for key, label, fn in ways:
                    self.vm.cmd('query-status')
                    StateBench.events(self)
                    row = fn()
                    time.sleep(0.1)
                    self.vm.cmd('query-status')
                    row['pause_ms'], _ = pauses(StateBench.events(self))
                    row.update(key=key, label=label, round=rnd)
                    rows.append(row)
                    print(f'  busy round {rnd}: {label}: pause '
                          f'{row["pause_ms"]:.1f} ms, written '
                          f'{row["written"] / row["bound"]:.2f} x bound',
                          file=sys.stderr, flush=True)
            self.check = self.vm.agent.check()
        finally:
            self.vm.shutdown(graceful=False)
        return rows


def print_busy_table(rows, args):
    print(f'\nvmsnap bench, a guest that does not converge: '
          f'{args.busy_guest_mem} MiB guest rewriting '
          f'{args.busy_dirty_mib} MiB as fast as it can, downtime-limit '
          f'{args.downtime_ms} ms, {args.busy_rounds} rounds, medians')
    print(f'{"method":<48} {"pause ms":>9} {"written/bound":>14} '
          f'{"passes":>7} {"total s":>8} {"completed":>10}')
    for key in dict.fromkeys(r['key'] for r in rows):
        rs = [r for r in rows if r['key'] == key]
        med = lambda k: statistics.median(r[k] or 0 for r in rs)
        done = sum(r['completed'] for r in rs)
        print(f'{rs[0]["label"]:<48} {med("pause_ms"):>9.1f} '
              f'{statistics.median(r["written"] / r["bound"] for r in rs):>14.2f} '
              f'{med("passes"):>7.0f} {med("total_s"):>8.2f} '
              f'{done:>4}/{len(rs):<5}')
    print('written/bound: bytes written (ram.transferred) over '
          'query-vmstate-size; a cancelled precopy saved nothing usable.')


def main():
    # vmsnap creates the state images with the qemu-img of this build
    os.environ.setdefault('VMSNAP_QEMU_IMG', guest.qemu_img())
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--json', help='write the results as JSON here')
    ap.add_argument('--extra-hold-ms', type=int, default=0,
                    help='sleep this long in the snapshot, standing for '
                    'slower storage (default 0)')
    ap.add_argument('--disk-mib', type=int, default=64)
    ap.add_argument('--guest-mem', type=int, default=256)
    ap.add_argument('--dirty-mem-mib', type=int, default=64)
    ap.add_argument('--dirty-mibs', type=int, default=16)
    ap.add_argument('--gap-s', type=float, default=0.3,
                    help='rest between snapshots')
    ap.add_argument('--state-guest-mem', type=int, default=1024,
                    help='guest RAM in MiB for the VM state part '
                    '(default 1024)')
    ap.add_argument('--state-dirty-mibs', type=int, default=32,
                    help='memory dirtying rate in MiB/s for the VM state '
                    'part (default 32)')
    ap.add_argument('--state-rounds', type=int, default=5,
                    help='saves of each kind (default 5)')
    ap.add_argument('--state-methods', default=','.join(
                        m[0] for m in STATE_METHODS),
                    help='the saves to run, comma separated (default all; '
                    f'{BASELINE} is always run)')
    ap.add_argument('--downtime-ms', type=int, default=20,
                    help='downtime-limit of every precopy save (default 20)')
    ap.add_argument('--skip-drain', action='store_true',
                    help='leave out stop/cont versus drain')
    ap.add_argument('--skip-state', action='store_true',
                    help='leave out the VM state saves')
    ap.add_argument('--skip-busy', action='store_true',
                    help='leave out the guest that does not converge')
    ap.add_argument('--busy-guest-mem', type=int, default=512)
    ap.add_argument('--busy-dirty-mib', type=int, default=128)
    ap.add_argument('--busy-rounds', type=int, default=3)
    ap.add_argument('--busy-limit-s', type=int, default=30,
                    help='cancel an upstream precopy of the busy guest '
                    'after this long (default 30)')
    ap.add_argument('--keep', action='store_true',
                    help='keep the temporary directory')
    args = ap.parse_args()
    args.state_methods = set(args.state_methods.split(',')) | {BASELINE}
    unknown = args.state_methods - {m[0] for m in STATE_METHODS}
    if unknown:
        ap.error(f'unknown --state-methods: {", ".join(sorted(unknown))}')

    tmp = tempfile.mkdtemp(prefix='vmsnap-bench-')
    results = {}
    t0 = time.monotonic()
    try:
        if not args.skip_drain:
            results['drain'] = run_drain(args, tmp)
        if not args.skip_state:
            results['state'] = run_state(args, tmp)
        if not args.skip_busy:
            bench = BusyBench(args, tmp)
            rows = bench.run()
            print_busy_table(rows, args)
            results['busy'] = rows
    finally:
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f'\n({time.monotonic() - t0:.0f} s in all)')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
            f.write('\n')
    return 0


def run_drain(args, tmp):
    """Stop/cont against drain: rounds, table, ratios."""
    bench = Bench(args, tmp)
    t0 = time.monotonic()
    try:
        boot_s = bench.boot()
        rounds = bench.run()
        check = bench.vm.agent.check()  # disks agree with the guest's RAM
        errors = bench.vm.agent_errors()
    finally:
        if bench.vm is not None:
            bench.vm.shutdown()

    info = {
        'rounds': args.rounds, 'accel': bench.vm.accel,
        'guest_mem': args.guest_mem, 'dirty_mem_mib': args.dirty_mem_mib,
        'dirty_mibs': args.dirty_mibs, 'extra_hold_ms': args.extra_hold_ms,
        'disk_mib': args.disk_mib, 'host': platform.node(),
        'cpus': os.cpu_count(), 'boot_s': boot_s,
        'total_s': time.monotonic() - t0,
        'final_agent_check_newest_seq': check, 'agent_errors': errors,
    }
    summary = summarize(rounds)
    print_table(rounds, summary, info)
    if errors:
        print(f'agent errors: {errors}')
    print(f'(agent CHECK OK {check} at the end; {info["total_s"]:.0f} s '
          f'in all)')
    return {'info': info, 'rounds': rounds, 'summary': summary}


def run_state(args, tmp):
    """The VM state saves and loads, side by side: table and ratios."""
    print('\nVM state: saving one running guest in each way, then loading '
          'each state into a fresh QEMU', file=sys.stderr, flush=True)
    bench = StateBench(args, tmp)
    t0 = time.monotonic()
    try:
        rows = bench.run()
    finally:
        for vm in bench.vms:
            vm.shutdown(graceful=False)
    info = {'accel': bench.vm.accel, 'guest_mem': args.state_guest_mem,
            'dirty_mem_mib': args.dirty_mem_mib,
            'dirty_mibs': args.state_dirty_mibs,
            'downtime_ms': args.downtime_ms,
            'seq_write_bps': bench.seq_write, 'seq_read_bps': bench.seq_read,
            'total_s': time.monotonic() - t0,
            'final_agent_check_newest_seq': bench.check,
            'agent_errors': bench.errors}
    summary = summarize_state(rows, bench)
    print_state_table(summary, bench, info)
    if bench.errors:
        print(f'agent errors: {bench.errors}')
    print(f'(agent CHECK OK {bench.check} on the saved guest at the end; '
          f'{info["total_s"]:.0f} s in all)')
    return {'info': info, 'rounds': rows, 'summary': summary}

if __name__ == '__main__':
    sys.exit(main())
