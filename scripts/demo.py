#!/usr/bin/env python3
"""make demo: a live storage snapshot of a running VM, end to end.

Boots the test guest with two disks (an ext4 disk holding a record file,
and a raw qcow2 disk), its workload agent writing checksummed records to
both and ticking on a vCPU.  Then runs "vmsnap drain-snapshot" (the
command scripts/setup-host.sh installs into the venv)
with qemu-ga: fsfreeze, block-drain-begin on both disks, a reflink copy of
the two images on the host, block-drain-end, thaw.  It shows that the guest
kept running meanwhile (agent ticks), and boots a fresh VM from the copies
whose agent checks that the disks and their records agree.

Then it saves the running guest's VM state live into a block node (a raw
image created with exactly the size query-vmstate-size asks for), in
mode "end": QEMU copies the RAM while the guest runs and pauses it only
at the switchover, where the demo copies the disk images too, so that
disks and VM state show one instant.  A fresh QEMU started with
-incoming defer on those copies loads the state, and the guest's agent,
back where it was, checks its disks against the records in its RAM and
goes on writing.

Last, a snapshot-group with "vmsnap group create": both disks as qcow2
internal snapshots with the VM state inside the first one, at the start
instant (a live savevm: the guest pauses only to snapshot the disks and
capture the device state, and runs while its RAM is saved).  "vmsnap group list" shows it, the guest runs on, and "vmsnap
group load" takes it back in place; the agent, back at the group's
instant, checks its disks against its RAM.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_repo = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_repo / 'python'), str(_repo / 'tests' / 'lib')]
from vmsnap import state  # noqa: E402
from vmsnaptest import guest  # noqa: E402


def boot(workdir, name, disks, mode, qmp=True, qga=True, extra_args=()):
    agent_sock = f'{workdir}/{name}-agent.sock'
    qmp_sock = f'{workdir}/{name}-qmp.sock'
    qga_sock = f'{workdir}/{name}-qga.sock' if qga else None
    extra = ['-qmp', f'unix:{qmp_sock},server=on,wait=off'] if qmp else []
    extra += list(extra_args)
    argv = guest.qemu_args(
        disks=disks, mode=mode, targets=['/mnt/data/records', '/dev/vdb'],
        agent_socket=agent_sock, qga_socket=qga_sock,
        console_log=f'{workdir}/{name}-console.log',
        accel=guest.probe_accel(), extra_args=extra)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    agent = guest.Agent(agent_sock, proc=proc)
    return proc, agent, qmp_sock, qga_sock


def main():
    # vmsnap creates the state image with the qemu-img of this build
    os.environ.setdefault('VMSNAP_QEMU_IMG', guest.qemu_img())
    workdir = tempfile.mkdtemp(prefix='vmsnap-demo-')
    data = guest.make_data_disk(f'{workdir}/data.qcow2', 64, ext4=True)
    raw = guest.make_data_disk(f'{workdir}/raw.qcow2', 16)
    print(f'== Booting the test guest ({guest.probe_accel()}), '
          f'images in {workdir}')
    proc, agent, qmp_sock, qga_sock = boot(workdir, 'live', [data, raw],
                                           'run')
    try:
        agent.wait_ready()
        time.sleep(2)       # let it write some records
        before = agent.stats()
        print(f'   agent running: {before["ticks"]} ticks, record '
              f'{before["last_complete"]} written to both disks')

        print('== vmsnap drain-snapshot (guest keeps running)')
        copy = (f'cp --reflink=auto {data} {workdir}/data-snap.qcow2 && '
                f'cp --reflink=auto {raw} {workdir}/raw-snap.qcow2')
        t0 = time.monotonic()
        rc = subprocess.call(
            [os.path.join(os.path.dirname(sys.executable), 'vmsnap'),
             'drain-snapshot',
             '--qmp', qmp_sock, '--qga', qga_sock, '--nodes', 'disk0,disk1',
             '--timeout', '30', 'command', copy])
        t1 = time.monotonic()
        if rc != 0:
            sys.exit('drain-snapshot failed')
        time.sleep(1)
        after = agent.stats()
        ticks = agent.ticks_between(t0, t1)
        print(f'   during the {1000 * (t1 - t0):.0f} ms the tool ran, the '
              f'guest vCPU ticked {ticks} times (10 ms each)')
        print(f'   the agent kept writing after it: record '
              f'{after["last_complete"]} (was {before["last_complete"]})')

        saved = save_state(workdir, qmp_sock, agent, [data, raw])
        live_group(qmp_sock, agent)
    finally:
        agent.close()
        proc.kill()
        proc.wait()

    print('== Booting a fresh VM from the snapshot copies, agent in check '
          'mode')
    proc, agent, _, _ = boot(workdir, 'restore',
                             [f'{workdir}/data-snap.qcow2',
                              f'{workdir}/raw-snap.qcow2'],
                             'check', qmp=False, qga=False)
    try:
        ev = agent.wait_line(r'^CHECK (OK \d+|FAIL .*)$', timeout=120,
                             since=0)
        print(f'   agent: {ev.text}')
    finally:
        agent.close()
        proc.kill()
        proc.wait()
    for img in ('data-snap.qcow2', 'raw-snap.qcow2'):
        subprocess.run([guest.qemu_img(), 'check', '-q',
                        f'{workdir}/{img}'], check=True)
    print('   qemu-img check: clean')
    if not ev.text.startswith('CHECK OK'):
        sys.exit('the snapshot is not consistent')

    load_state(workdir, saved)
    subprocess.run(['rm', '-rf', workdir], check=False)


def save_state(workdir, qmp_sock, agent, disks):
    """vmsnap save-state --mode end into a new raw image; at the
    switchover (guest stopped, disks flushed) copy the disk images."""
    print('== vmsnap save-state --mode end: the VM state into a block node, '
          'guest running')
    state_file = f'{workdir}/vmstate.raw'
    copies = [f'{workdir}/state-{os.path.basename(d)}' for d in disks]

    def copy_disks():
        for src, dst in zip(disks, copies):
            subprocess.run(['cp', '--reflink=auto', src, dst], check=True)

    before = agent.stats()
    t0 = time.monotonic()
    result = state.save(qmp_sock, file=state_file, fmt='raw', create=True,
                        mode='end', downtime_ms=20, at_switchover=copy_disks,
                        progress=state.Progress(prefix='   '),
                        log=lambda msg: print(f'   {msg}', flush=True))
    t1 = time.monotonic()
    if not result.ok:
        sys.exit(f'save-state failed: {result.error}')
    time.sleep(1)
    after = agent.stats()
    mib = 1048576
    print(f'   size: query-vmstate-size {result.size["total"] / mib:.1f} '
          f'MiB; {result.bytes_written / mib:.1f} MiB written; the raw '
          f'image takes {result.allocated / mib:.1f} MiB on disk (zero '
          f'pages stay holes)')
    print(f'   guest paused {result.pause_ms:.1f} ms at the switchover, '
          f'{result.switchover_ms:.0f} ms of it copying the disks; QEMU '
          f'downtime {result.downtime_ms} ms')
    print(f'   during the {1000 * (t1 - t0):.0f} ms of the save the guest '
          f'vCPU ticked {agent.ticks_between(t0, t1)} times; the agent '
          f'went on from record {before["last_complete"]} to '
          f'{after["last_complete"]}; VM {result.vm_status}')
    return state_file, copies


def vmsnap(*args):
    argv = [os.path.join(os.path.dirname(sys.executable), 'vmsnap'), *args]
    print(f'   $ vmsnap {" ".join(args)}', flush=True)
    if subprocess.call(argv) != 0:
        sys.exit(f'vmsnap {args[0]} {args[1]} failed')


def live_group(qmp_sock, agent):
    """A live internal snapshot of both disks and the VM state; list it;
    load it back in place; the agent checks."""
    print('== vmsnap group: both disks and the VM state, one instant, '
          'guest running')
    before = agent.stats()
    t0 = time.monotonic()
    vmsnap('group', 'create', '--qmp', qmp_sock, '--tag', 'demo',
           '--disk', 'disk0=internal', '--disk', 'disk1=internal',
           '--state-internal', 'disk0', '--instant', 'start')
    t1 = time.monotonic()
    taken = agent.stats()
    print(f'   during the {1000 * (t1 - t0):.0f} ms of the group the guest '
          f'vCPU ticked {agent.ticks_between(t0, t1)} times; records '
          f'{before["last_complete"]} -> {taken["last_complete"]}')
    vmsnap('group', 'list', '--qmp', qmp_sock)
    time.sleep(5)
    later = agent.stats()
    print(f'   the guest runs on: record {later["last_complete"]}')
    vmsnap('group', 'load', '--qmp', qmp_sock, '--tag', 'demo')
    try:
        checked = agent.check()
    except AssertionError as err:
        sys.exit(f'the loaded group is not consistent: {err}')
    print(f'   agent: CHECK OK {checked}: back at the group\'s instant '
          f'(records {before["last_complete"]}-{taken["last_complete"]}), '
          f'disks and RAM agree')
    if not before['last_complete'] <= checked <= later['last_complete']:
        sys.exit(f'the loaded guest is at record {checked}, not at the '
                 f'group\'s instant')
    vmsnap('group', 'delete', '--qmp', qmp_sock, '--tag', 'demo')


def load_state(workdir, saved):
    """A fresh QEMU on the disk copies loads the state; the agent, back
    where it was, checks disks against its RAM and keeps writing."""
    state_file, copies = saved
    print('== vmsnap load-state: a fresh QEMU (-incoming defer) on the '
          'disk copies from the switchover')
    proc, agent, qmp_sock, _ = boot(workdir, 'loaded', copies, 'run',
                                    extra_args=['-incoming', 'defer'])
    try:
        result = state.load(qmp_sock, file=state_file,
                            log=lambda msg: print(f'   {msg}', flush=True))
        if not result.ok:
            sys.exit(f'load-state failed: {result.error}')
        print(f'   loaded in {result.total_ms:.0f} ms; VM '
              f'{result.vm_status}')
        agent.wait_ready(timeout=60)
        resumed = agent.stats()
        checked = agent.check()
        time.sleep(1)
        after = agent.stats()
        print(f'   agent: CHECK OK {checked} (disks agree with the record '
              f'ledger in the restored RAM)')
        print(f'   the restored guest goes on: record '
              f'{resumed["last_complete"]} -> {after["last_complete"]}')
        if after['last_complete'] <= resumed['last_complete']:
            sys.exit('the restored guest does not write any more')
    except AssertionError as err:
        sys.exit(f'the restored guest is not consistent: {err}')
    finally:
        agent.close()
        proc.kill()
        proc.wait()


if __name__ == '__main__':
    main()
