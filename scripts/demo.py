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
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'python'))
from vmsnap import guest  # noqa: E402


def boot(workdir, name, disks, mode, qmp=True, qga=True):
    agent_sock = f'{workdir}/{name}-agent.sock'
    qmp_sock = f'{workdir}/{name}-qmp.sock'
    qga_sock = f'{workdir}/{name}-qga.sock' if qga else None
    extra = ['-qmp', f'unix:{qmp_sock},server=on,wait=off'] if qmp else []
    argv = guest.qemu_args(
        disks=disks, mode=mode, targets=['/mnt/data/records', '/dev/vdb'],
        agent_socket=agent_sock, qga_socket=qga_sock,
        console_log=f'{workdir}/{name}-console.log',
        accel=guest.probe_accel(), extra_args=extra)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    agent = guest.Agent(agent_sock, proc=proc)
    return proc, agent, qmp_sock, qga_sock


def main():
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
    subprocess.run(['rm', '-rf', workdir], check=False)


if __name__ == '__main__':
    main()
