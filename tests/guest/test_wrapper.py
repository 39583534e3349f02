"""The drain-snapshot wrapper end to end, checked inside the test guest.

The guest's agent writes records to a file on an ext4 disk and to a raw
disk.  If the wrapper left the guest frozen or drained, those writes would
stop: the agent's last complete record tells.  A copy taken by the wrapper
must boot in a fresh VM whose agent finds every record consistent.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from avocado import Test
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmsnaptest import guest

TARGETS = ['/mnt/data/records', '/dev/vdb']


class DrainSnapshotWrapper(Test):

    def setUp(self):
        self.procs = []
        self.agents = []
        self.dir = self.workdir
        # Unix socket paths must stay short; avocado's workdir is long.
        self.sockdir = tempfile.mkdtemp(prefix='vmsnap-', dir='/tmp')
        self.data = guest.make_data_disk(f'{self.dir}/data.qcow2', 64,
                                         ext4=True)
        self.raw = guest.make_data_disk(f'{self.dir}/raw.qcow2', 16)

    def tearDown(self):
        for agent in self.agents:
            agent.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def boot(self, name, disks, mode='run'):
        agent_sock = f'{self.sockdir}/{name}-agent.sock'
        self.qmp_sock = f'{self.sockdir}/{name}-qmp.sock'
        self.qga_sock = f'{self.sockdir}/{name}-qga.sock'
        self.test_sock = f'{self.sockdir}/{name}-test.sock'
        extra = ['-qmp', f'unix:{self.qmp_sock},server=on,wait=off',
                 '-chardev', f'socket,id=testmon,path={self.test_sock},'
                 'server=on,wait=off', '-mon', 'chardev=testmon,mode=control']
        argv = guest.qemu_args(
            disks=disks, mode=mode, targets=TARGETS, agent_socket=agent_sock,
            qga_socket=self.qga_sock if mode == 'run' else None,
            console_log=f'{self.dir}/{name}-console.log',
            accel=guest.probe_accel(), extra_args=extra)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        agent = guest.Agent(agent_sock, proc=proc)
        self.agents.append(agent)
        return agent

    def wrapper(self, *args):
        argv = [sys.executable, '-m', 'vmsnap', 'drain-snapshot',
                '--qmp', self.qmp_sock, '--qga', self.qga_sock,
                '--nodes', 'disk0,disk1', '--timeout', '60', '--json', *args]
        env = dict(os.environ, PYTHONPATH=str(guest.REPO / 'python'))
        return subprocess.Popen(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=self.default_signals)

    @staticmethod
    def default_signals():
        # The avocado runner blocks or ignores SIGINT in the test process,
        # and children inherit that; the wrapper must see it as from a
        # terminal.
        signal.pthread_sigmask(signal.SIG_UNBLOCK,
                               {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def assert_guest_writes(self, agent, since_record):
        """The agent completes new records on both disks: not frozen,
        not drained."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = agent.stats()['last_complete']
            if now > since_record + 5:
                return now
            time.sleep(0.2)
        self.fail(f'the guest completed no new records after the wrapper '
                  f'(still at {now}, was {since_record})')

    def test_snapshot_and_check_copy(self):
        agent = self.boot('live', [self.data, self.raw])
        agent.wait_ready()
        time.sleep(1)
        before = agent.stats()['last_complete']

        data_copy = f'{self.dir}/data-snap.qcow2'
        raw_copy = f'{self.dir}/raw-snap.qcow2'
        t0 = time.monotonic()
        proc = self.wrapper('command',
                            f'cp --reflink=auto {self.data} {data_copy} && '
                            f'cp --reflink=auto {self.raw} {raw_copy}')
        out, _ = proc.communicate(timeout=120)
        t1 = time.monotonic()
        self.log.info(out)
        self.assertEqual(proc.returncode, 0, out)
        result = json.loads(out.strip().splitlines()[-2])
        self.assertEqual(result['end_reason'], 'requested')
        self.assertGreaterEqual(result['frozen_filesystems'], 1)
        self.assertIsInstance(result['held_ms'], int)

        # The vCPU ran while the wrapper held I/O: at 10 ms per tick, a
        # stopped guest would show (almost) none.
        time.sleep(0.5)
        ticks = agent.ticks_between(t0, t1)
        self.log.info(f'{ticks} ticks in {1000 * (t1 - t0):.0f} ms')
        self.assertGreater(ticks, 0)
        self.assert_guest_writes(agent, before)

        # The copies hold a consistent state.
        check = self.boot('restore', [data_copy, raw_copy], mode='check')
        ev = check.wait_line(r'^CHECK (OK \d+|FAIL .*)$', timeout=120,
                             since=0)
        self.assertTrue(ev.text.startswith('CHECK OK'), ev.text)
        self.procs[-1].kill()       # it holds the images' locks
        self.procs[-1].wait()
        for img in (data_copy, raw_copy):
            subprocess.run([guest.qemu_img(), 'check', '-q', img],
                           check=True)

    def test_interrupt_ends_drain_and_thaws(self):
        agent = self.boot('live', [self.data, self.raw])
        agent.wait_ready()
        proc = self.wrapper('command', 'sleep 60')
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith('drain '):
                break
        else:
            self.fail(f'the wrapper never began the drain: {lines}')
        stuck_at = agent.stats()['last_complete']
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        out = ''.join(lines) + out
        self.log.info(out)
        self.assertEqual(proc.returncode, 1, out)
        self.assertIn('error: interrupted', out)
        self.assertIn('drain ended (requested)', out)
        self.assertIn('thawed', out)

        mon = QEMUMonitorProtocol(self.test_sock)
        mon.connect()
        try:
            self.assertEqual(mon.cmd('query-block-drains'), [])
            self.assertEqual(mon.cmd('query-status')['status'], 'running')
        finally:
            mon.close()
        self.assert_guest_writes(agent, stuck_at)

    def test_failing_snapshot_ends_drain_and_thaws(self):
        agent = self.boot('live', [self.data, self.raw])
        agent.wait_ready()
        before = agent.stats()['last_complete']
        proc = self.wrapper('command', 'echo no space left >&2; exit 5')
        out, _ = proc.communicate(timeout=60)
        self.log.info(out)
        self.assertEqual(proc.returncode, 1, out)
        self.assertIn('exited with 5: no space left', out)
        self.assertIn('thawed', out)
        self.assert_guest_writes(agent, before)
