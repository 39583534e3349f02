"""One QEMU process running the vmsnap test guest, with its agent and QMP.

guest.py builds the command line and speaks the agent's protocol; this
module puts a running VM together from them and adds QMP, through
qemu.qmp's synchronous QEMUMonitorProtocol.  It serves the guest-level
tests (tests/guest/) and the benchmark (scripts/bench.py):

    vm = VM('writer', sockdir, logdir, [disk], ['/dev/vda']).launch()
    try:
        vm.agent.wait_ready()
        vm.wait_records(50)
        vm.cmd('block-drain-begin', id='d', nodes=['disk0'], timeout=30)
        ...
        vm.cmd('block-drain-end', id='d')
        vm.wait_event('BLOCK_DRAIN_END', id='d')
    finally:
        vm.shutdown()

Disk i is block node 'disk<i>' (see guest.qemu_args).  Failures that
mean the guest did not do what was asked (records stuck, no CHECK answer)
raise AssertionError carrying the tails of the console and QEMU logs.
"""

import json
import os
import re
import shutil
import subprocess
import time

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmsnaptest import guest

CHECK_RE = r'^CHECK (OK (\d+)|FAIL (.*))$'
GDB_BLOCK = os.path.join(os.path.dirname(__file__), 'gdb_block.py')


def stop_qemu(proc, qmp, graceful=True):
    """QMP quit and wait for QEMU @proc (graceful), or kill it; close
    @qmp (a QEMUMonitorProtocol, or None)."""
    if qmp is not None:
        if graceful and proc.poll() is None:
            try:
                qmp.settimeout(5)
                qmp.cmd('quit')
            except Exception:       # pylint: disable=broad-except
                pass
        try:
            qmp.close()
        except Exception:           # pylint: disable=broad-except
            pass
    if proc is not None:
        try:
            proc.wait(10 if graceful else 0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class VM:
    """One QEMU process running the test guest, with agent and QMP.

    name prefixes the files the VM makes: sockets (<name>-agent.sock,
    <name>-qmp<i>.sock) in sockdir, which must be short enough for unix
    socket paths, and logs (<name>-console.log, <name>-qemu.log) in logdir.
    disks, targets, mode and guest_kw go to guest.qemu_args(); the
    accelerator is guest.probe_accel()'s (in self.accel).  The VM has
    n_qmp QMP monitors, each taking one client; launch() connects self.qmp
    to the first.  extra_args are added to QEMU's command line.
    """

    def __init__(self, name, sockdir, logdir, disks, targets, mode='run',
                 n_qmp=1, extra_args=(), **guest_kw):
        self.name = name
        self.mode = mode
        self.disks = list(disks)
        self.agent_sock = os.path.join(sockdir, f'{name}-agent.sock')
        self.qmp_socks = [os.path.join(sockdir, f'{name}-qmp{i}.sock')
                          for i in range(n_qmp)]
        self.console_log = os.path.join(logdir, f'{name}-console.log')
        self.qemu_log = os.path.join(logdir, f'{name}-qemu.log')
        extra = list(extra_args)
        for s in self.qmp_socks:
            extra += ['-qmp', f'unix:{s},server=on,wait=off']
        self.accel = guest.probe_accel()
        self.argv = guest.qemu_args(
            disks=disks, mode=mode, targets=targets,
            agent_socket=self.agent_sock, console_log=self.console_log,
            accel=self.accel, extra_args=extra, **guest_kw)
        self.proc = None
        self.agent = None
        self.qmp = None
        self.events = []        # QMP events pulled but not yet waited for

    def launch(self):
        """Start QEMU, connect the agent and the first QMP monitor."""
        with open(self.qemu_log, 'wb') as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.agent = guest.Agent(self.agent_sock, proc=self.proc)
        if self.qmp_socks:
            self.qmp = self.connect_qmp(0)
        return self

    def connect_qmp(self, index):
        """A QMP client on monitor index (each takes one client)."""
        deadline = time.monotonic() + 30
        while True:
            qmp = QEMUMonitorProtocol(self.qmp_socks[index])
            try:
                qmp.connect()
                qmp.settimeout(60)
                return qmp
            except (OSError, QMPError) as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'cannot connect QMP: {e}; '
                                       f'{self.diagnostics()}') from e
                time.sleep(0.05)

    def cmd(self, name, **args):
        """Run QMP command name on self.qmp; its return value."""
        return self.qmp.cmd(name, **args)

    def hmp(self, command_line):
        """Run an HMP command through QMP; its output."""
        return self.cmd('human-monitor-command',
                        **{'command-line': command_line})

    def wait_event(self, name, timeout=10.0, match=None, **data):
        """Wait for QMP event name whose data has the given items.

        Keyword names stand for QMP member names with '-' written '_';
        match, if given, is a further test of the event's data.
        Events pulled on the way are kept in self.events for later waits.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                evdata = ev.get('data', {})
                if ev['event'] == name and all(
                        evdata.get(k.replace('_', '-')) == v
                        for k, v in data.items()) and \
                        (match is None or match(evdata)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f'no {name} {data} event in {timeout} s; '
                                   f'got {self.events}')
            try:
                self.events.append(self.qmp.pull_event(wait=float(left)))
            except TimeoutError:
                pass

    def mark(self, label, timeout=10.0):
        """MARK: (host arrival time, ticks, last_complete)."""
        ev = self.agent.command(f'MARK {label}',
                                rf'^MARK {re.escape(label)} (\d+) (\d+)$',
                                timeout)
        return ev.time, int(ev[1]), int(ev[2])

    def wait_records(self, minimum, timeout=30.0):
        """Wait until the agent has completed record minimum; its stats."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent.stats()
            if st['last_complete'] >= minimum:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(
                    f'guest records stuck at {st["last_complete"]} (wanted '
                    f'{minimum}); {self.hang_report()}; '
                    f'{self.diagnostics()}')
            time.sleep(0.05)

    def hang_report(self):
        """Where a stuck QEMU waits, into NAME-hang.txt next to its log:
        every thread's backtrace (gdb), its block jobs, drains and block
        graph, and the migration.  Returns where it went."""
        path = self.qemu_log.replace('-qemu.log', '-hang.txt')
        with open(path, 'w') as f:
            # First: it answers even when the main loop does not
            if shutil.which('gdb') and self.proc:
                out = subprocess.run(
                    ['gdb', '-p', str(self.proc.pid), '-batch', '-nx',
                     '-ex', 'thread apply all bt', '-x', GDB_BLOCK],
                    capture_output=True, text=True, timeout=120,
                    check=False)
                f.write(out.stdout + out.stderr)
            cmds = [(c, {}) for c in ('query-status', 'query-migrate',
                                      'query-jobs', 'query-block-drains',
                                      'x-debug-query-block-graph')]
            # Each virtio-blk queue: requests the guest made available,
            # those QEMU took, and those it completed
            cmds += [('x-query-virtio-queue-status',
                      {'path': f'/machine/peripheral/vd{i}/virtio-backend',
                       'queue': 0}) for i in range(len(self.disks))]
            for cmd, args in cmds:
                try:
                    ret = self.cmd(cmd, **args)
                    f.write(f'{cmd} {args}: {json.dumps(ret)}\n')
                    if cmd == 'x-query-virtio-queue-status':
                        # The guest's own indexes, in its memory
                        for ring in ('avail', 'used'):
                            xp = self.hmp('xp /1hx '
                                          f'{ret["vring-" + ring] + 2}')
                            f.write(f'  guest {ring} idx: {xp.strip()}\n')
                except QMPError as err:
                    f.write(f'{cmd} {args}: {err}\n')
                except (OSError, ValueError) as err:
                    f.write(f'{cmd}: {err}\n')
                    return f'QEMU threads and state in {path}'
            # Whether the vCPU has an interrupt waiting, and where it is
            for line in ('info lapic', 'info registers'):
                try:
                    f.write(f'{line}:\n{self.hmp(line)}\n')
                except (QMPError, OSError, ValueError) as err:
                    f.write(f'{line}: {err}\n')
        return f'QEMU threads and state in {path}'

    def agent_errors(self):
        """The ERROR lines the agent has sent so far."""
        return [t for _, t in self.agent.lines if t.startswith('ERROR')]

    def wait_check(self, timeout=120.0):
        """In mode=check: ('OK', newest seq) or ('FAIL', reason)."""
        try:
            ev = self.agent.wait_line(CHECK_RE, timeout, since=0)
        except (EOFError, TimeoutError) as e:
            raise AssertionError(f'no CHECK answer: {e}; '
                                 f'{self.diagnostics()}') from e
        if ev[3] is not None:
            return 'FAIL', ev[3]
        return 'OK', int(ev[2])

    def diagnostics(self, lines=15):
        """The last lines of the console and QEMU logs, for messages."""
        out = []
        for path in (self.console_log, self.qemu_log):
            try:
                with open(path, errors='replace') as f:
                    tail = f.read().splitlines()[-lines:]
            except OSError:
                continue
            out.append(f'{os.path.basename(path)}: ' + ' | '.join(tail))
        return '; '.join(out) or '(no logs)'

    def shutdown(self, graceful=True):
        """QMP quit and wait for QEMU (graceful), or kill it; close all."""
        stop_qemu(self.proc, self.qmp, graceful)
        self.qmp = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
