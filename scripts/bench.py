#!/usr/bin/env python3
"""Guest pause of a host storage snapshot: stop/cont against block drain.

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

    PYTHONPATH=python $venv/bin/python scripts/bench.py [--rounds 5]
        [--extra-hold-ms 0] [--json out.json]

Nothing here asserts on timings; the numbers are for reading.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from vmsnap import guest
from vmsnap.vm import VM

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


def main():
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
    ap.add_argument('--keep', action='store_true',
                    help='keep the temporary directory')
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix='vmsnap-bench-')
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
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

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
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'info': info, 'rounds': rounds, 'summary': summary},
                      f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
