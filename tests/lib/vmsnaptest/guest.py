"""Run the vmsnap test guest and talk to its workload agent.

The guest (built by scripts/build-guest.sh) is a kernel plus initramfs
whose init starts ``vmsnap-agent`` on the second serial port.  This
module builds QEMU command lines for it, makes data disks, and speaks the
agent's line protocol (see guest/agent/vmsnap-agent.c):

    argv = qemu_args(disks=[raw, data], targets=['/dev/vdb',
                     '/mnt/data/records'], agent_socket=sock,
                     console_log=log)
    proc = subprocess.Popen(argv)
    with Agent(sock, proc=proc) as agent:
        agent.wait_ready()
        agent.check()

Plain standard library on purpose: QMP is handled elsewhere.
"""

import bisect
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
QEMU_BUILD = Path(os.environ.get('VMSNAP_QEMU_BUILD', REPO / 'qemu' / 'build'))
# build-qemu.sh links the firmware (bios-256k.bin and friends) here.
FIRMWARE_DIR = QEMU_BUILD / 'qemu-bundle' / 'usr' / 'local' / 'share' / 'qemu'

# Where a target of the agent's records lives inside the guest: files under
# this directory are on the ext4 filesystem of the first disk (/dev/vda).
DATA_MOUNT = '/mnt/data'


def cache_dir():
    """$VMSNAP_CACHE, defaulted exactly like scripts/pins.sh does."""
    if os.environ.get('VMSNAP_CACHE'):
        return Path(os.environ['VMSNAP_CACHE'])
    xdg = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
    return Path(xdg) / 'vmsnap'


def guest_dir():
    return cache_dir() / 'guest'


def _build_file(name):
    path = QEMU_BUILD / name
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f'{path} is missing; run scripts/build-qemu.sh')
    return str(path)


def qemu_system():
    """Path of the patched qemu-system-x86_64."""
    return _build_file('qemu-system-x86_64')


def qemu_img():
    """Path of the patched qemu-img."""
    return _build_file('qemu-img')


def guest_files():
    """(kernel, initrd) of the test guest."""
    d = guest_dir()
    kernel, initrd = d / 'vmlinuz', d / 'initrd.img'
    for f in (kernel, initrd):
        if not f.is_file():
            raise FileNotFoundError(
                f'{f} is missing; run scripts/build-guest.sh')
    return str(kernel), str(initrd)


def make_data_disk(path, size_mib, fmt='qcow2', ext4=False):
    """Create an empty disk image; with ext4=True it holds a fresh ext4.

    mkfs.ext4 only writes raw files, so a qcow2 ext4 disk is made raw
    first and converted.  Lazy inode table and journal initialisation are
    turned off: otherwise the guest kernel finishes them in the background
    and writes to the disk behind the workload's back.
    """
    if fmt not in ('qcow2', 'raw'):
        raise ValueError(f'unsupported disk format {fmt!r}')
    path = str(path)
    img = qemu_img()
    if not ext4:
        subprocess.run([img, 'create', '-q', '-f', fmt, path,
                        f'{size_mib}M'], check=True)
        return path
    mkfs = (shutil.which('mkfs.ext4') or shutil.which('mkfs.ext4', path='/sbin:/usr/sbin'))
    if not mkfs:
        raise FileNotFoundError('mkfs.ext4 not found; run scripts/setup-host.sh')
    raw = path if fmt == 'raw' else path + '.raw.tmp'
    try:
        subprocess.run([img, 'create', '-q', '-f', 'raw', raw,
                        f'{size_mib}M'], check=True)
        subprocess.run([mkfs, '-F', '-q', '-L', 'vmsnap-data', '-E',
                        'lazy_itable_init=0,lazy_journal_init=0', raw],
                       check=True)
        if fmt == 'qcow2':
            subprocess.run([img, 'convert', '-q', '-f', 'raw', '-O', 'qcow2',
                            raw, path], check=True)
    finally:
        if raw != path and os.path.exists(raw):
            os.unlink(raw)
    return path


def disk_format(path):
    """'qcow2' or 'raw', from the image's first bytes."""
    with open(path, 'rb') as f:
        return 'qcow2' if f.read(4) == b'QFI\xfb' else 'raw'


def _chardev_value(value):
    # QEMU's option syntax doubles a comma to put it inside a value.
    return str(value).replace(',', ',,')


def kernel_cmdline(mode='run', targets=(), mem_mib=0, dirty_mibs=0,
                   write_interval_ms=None, extra_append=''):
    """The kernel command line that tells guest/init what to do."""
    if mode not in ('run', 'check', 'shell'):
        raise ValueError(f'unknown guest mode {mode!r}')
    # quiet: every console line is slow under TCG; panic=-1 plus QEMU's
    # -no-reboot turn a guest panic into QEMU exiting.
    parts = ['console=ttyS0', 'quiet', 'panic=-1', f'vmsnap.mode={mode}']
    if targets:
        for t in targets:
            if ',' in t or ' ' in t:
                raise ValueError(f'target path {t!r} has a comma or space')
        parts.append('vmsnap.targets=' + ','.join(targets))
    if mem_mib:
        parts.append(f'vmsnap.mem={int(mem_mib)}')
    if dirty_mibs:
        parts.append(f'vmsnap.dirty={int(dirty_mibs)}')
    if write_interval_ms is not None:
        parts.append(f'vmsnap.interval={int(write_interval_ms)}')
    if extra_append:
        parts.append(extra_append)
    return ' '.join(parts)


def qemu_args(disks=(), mode='run', targets=(), mem_mib=0, dirty_mibs=0,
              write_interval_ms=None, agent_socket=None, qga_socket=None,
              console_log=None, mem=256, smp=1, accel='tcg', machine='pc',
              qemu=None, firmware_dirs=None, extra_append='', extra_args=(),
              iothread=False):
    """argv for qemu-system-x86_64 running the test guest.

    disks: image paths, or (path, format) pairs; disk i gets block node
    'disk<i>' (its file node 'disk<i>-file') and virtio-blk device 'vd<i>',
    and shows up in the guest as /dev/vda, /dev/vdb, ... in order.  If any
    target is under /mnt/data, disk 0 must hold an ext4 filesystem.
    targets: where the agent writes records, in order.
    mem_mib/dirty_mibs: memory the agent keeps dirtying, and how fast.
    mem: guest RAM in MiB.
    agent_socket: unix socket path where QEMU listens for the agent
    channel (the guest's ttyS1); see Agent.
    qga_socket: unix socket path for qemu-ga (virtio-serial port
    org.qemu.guest_agent.0); None for no guest agent.
    console_log: file receiving the guest console (ttyS0).
    iothread: run the virtio-blk devices in an iothread ('iothread0').
    qemu: the qemu-system-x86_64 to run (default: the build's).
    firmware_dirs: the -L directories (default: the build's bundle); ()
    for none, so that an installed QEMU has to find its own firmware.
    """
    kernel, initrd = guest_files()
    if firmware_dirs is None:
        firmware_dirs = [FIRMWARE_DIR]
    argv = [qemu or qemu_system()]
    for d in firmware_dirs:
        argv += ['-L', str(d)]
    argv += ['-nodefaults', '-nic', 'none', '-display', 'none',
             '-no-reboot',
             '-machine', machine, '-accel', accel,
             '-m', str(mem), '-smp', str(smp),
             '-kernel', kernel, '-initrd', initrd,
             '-append', kernel_cmdline(mode, targets, mem_mib, dirty_mibs,
                                       write_interval_ms, extra_append)]

    # Serial ports in order: ttyS0 console, ttyS1 agent channel.  A port
    # nobody listens on still has to exist so the numbering holds.
    if console_log:
        argv += ['-chardev',
                 f'file,id=console0,path={_chardev_value(console_log)}',
                 '-serial', 'chardev:console0']
    else:
        argv += ['-serial', 'null']
    if agent_socket:
        # wait=off: QEMU starts without a client; lines sent while none
        # is connected are lost, which Agent.wait_ready() copes with.
        argv += ['-chardev', 'socket,id=agent0,server=on,wait=off,'
                 f'path={_chardev_value(agent_socket)}',
                 '-serial', 'chardev:agent0']
    else:
        argv += ['-serial', 'null']

    if iothread:
        argv += ['-object', 'iothread,id=iothread0']
    for i, d in enumerate(disks):
        path, fmt = (d if isinstance(d, (tuple, list))
                     else (d, disk_format(d)))
        node = {'driver': fmt, 'node-name': f'disk{i}',
                'file': {'driver': 'file', 'filename': str(path),
                         'node-name': f'disk{i}-file'}}
        device = f'virtio-blk-pci,drive=disk{i},id=vd{i}'
        if iothread:
            device += ',iothread=iothread0'
        argv += ['-blockdev', json.dumps(node), '-device', device]

    if qga_socket:
        argv += ['-chardev', 'socket,id=qga0,server=on,wait=off,'
                 f'path={_chardev_value(qga_socket)}',
                 '-device', 'virtio-serial-pci,id=vser0',
                 '-device', 'virtserialport,bus=vser0.0,chardev=qga0,'
                 'name=org.qemu.guest_agent.0']
    argv += list(extra_args)
    return argv


@dataclasses.dataclass
class Event:
    """A line from the agent that matched what was waited for."""
    time: float         # host time.monotonic() when it arrived
    text: str
    match: re.Match

    def group(self, *args):
        return self.match.group(*args)

    def __getitem__(self, i):
        return self.match[i]


class Agent:
    """Client of the agent channel (the guest's ttyS1 on a unix socket).

    A reader thread collects every line with its host arrival time; the
    TICK lines are also kept as samples for ticks_between().
    """

    TICK_RE = re.compile(r'^TICK (\d+) (\d+)$')

    def __init__(self, path, timeout=30.0, proc=None):
        """Connect to QEMU's socket at path, retrying while QEMU starts.

        proc, the QEMU subprocess.Popen, makes the wait end at once if
        QEMU exits.
        """
        self.path = str(path)
        self.lines = []         # (host_time, text)
        self._tick_times = []   # host times of the TICK lines
        self._tick_counts = []
        self._cond = threading.Condition()
        self._cursor = 0
        self._eof = False
        self.sock = self._connect(timeout, proc)
        self._thread = threading.Thread(target=self._reader, daemon=True,
                                        name=f'agent-reader {self.path}')
        self._thread.start()

    def _connect(self, timeout, proc):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError as e:
                s.close()
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f'QEMU exited with status '
                                       f'{proc.returncode} before the agent '
                                       f'socket {self.path} came up') from e
                if time.monotonic() > deadline:
                    raise TimeoutError(f'cannot connect to agent socket '
                                       f'{self.path}: {e}') from e
                time.sleep(0.05)

    def _reader(self):
        buf = b''
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b''
            if not data:
                break
            now = time.monotonic()
            buf += data
            *complete, buf = buf.split(b'\n')
            with self._cond:
                for raw in complete:
                    text = raw.decode('utf-8', 'replace').rstrip('\r')
                    self.lines.append((now, text))
                    m = self.TICK_RE.match(text)
                    if m:
                        self._tick_times.append(now)
                        self._tick_counts.append(int(m.group(1)))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _context(self, n=8):
        recent = [t for _, t in self.lines if not t.startswith('TICK ')]
        return '; '.join(recent[-n:]) or '(nothing but TICKs)'

    def wait_line(self, regex, timeout=60.0, since=None):
        """Wait for a line matching regex (re.search) and return an Event.

        Looks at lines from index since on; by default from just after the
        line the previous wait_line() returned.  Raises TimeoutError, or
        EOFError when QEMU closed the channel.
        """
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = self._cursor if since is None else since
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    i += 1
                    m = pattern.search(text)
                    if m:
                        self._cursor = i
                        return Event(t, text, m)
                if self._eof:
                    raise EOFError(f'agent channel closed while waiting for '
                                   f'{regex!r}; last lines: '
                                   f'{self._context()}')
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f'no {regex!r} from the agent in '
                                       f'{timeout} s; last lines: '
                                       f'{self._context()}')
                self._cond.wait(left)

    def send(self, line):
        if '\n' in line:
            raise ValueError('agent commands are single lines')
        self.sock.sendall(line.encode() + b'\n')

    def command(self, line, regex, timeout=60.0):
        """Send a command and wait for its answer (only lines after it)."""
        with self._cond:
            start = len(self.lines)
        self.send(line)
        return self.wait_line(regex, timeout, since=start)

    def wait_ready(self, timeout=120.0):
        """Wait until the agent runs.

        A TICK counts as well as READY, so that connecting after READY went
        by (into a socket nobody listened on) is fine.
        """
        return self.wait_line(r'^(READY|TICK \d+ \d+)$', timeout, since=0)

    def ping(self, timeout=10.0):
        self.command('PING', r'^PONG$', timeout)

    def mark(self, label, timeout=10.0):
        """Tag a point in time: returns (ticks, last_complete) right then."""
        if not label or any(c.isspace() and c != ' ' for c in label):
            raise ValueError(f'bad mark label {label!r}')
        ev = self.command(f'MARK {label}',
                          rf'^MARK {re.escape(label)} (\d+) (\d+)$', timeout)
        return int(ev[1]), int(ev[2])

    def check(self, timeout=120.0):
        """Have the agent verify disks against RAM; returns the newest seq.

        Raises AssertionError with the agent's reason if the check fails.
        """
        ev = self.command('CHECK', r'^CHECK (OK (\d+)|FAIL (.*))$', timeout)
        if ev[3] is not None:
            raise AssertionError(f'agent CHECK failed: {ev[3]}')
        return int(ev[2])

    def stats(self, timeout=10.0):
        """dict of ticks, last_complete, in_flight, dirtied_pages."""
        ev = self.command('STATS', r'^STATS (\d+) (\d+) (\d+) (\d+)$',
                          timeout)
        return dict(zip(('ticks', 'last_complete', 'in_flight',
                         'dirtied_pages'), map(int, ev.match.groups())))

    def ticks_at(self, t):
        """Tick count the agent had last reported by host time t."""
        with self._cond:
            i = bisect.bisect_right(self._tick_times, t)
            if i == 0:
                raise ValueError(f'no TICK line received by host time {t}')
            return self._tick_counts[i - 1]

    def ticks_between(self, t0, t1):
        """Guest ticks (10 ms each) between host monotonic times t0 and t1.

        Based on the TICK lines, which come every 10 ticks, so the result
        is good to about 10 ticks.  A guest that stopped running (a pause,
        a stall) shows fewer ticks than (t1 - t0) / 10 ms.
        """
        return self.ticks_at(t1) - self.ticks_at(t0)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe_accel(qemu=None):
    """'kvm' if the guest really boots under KVM here, else 'tcg'.

    A /dev/kvm that exists does not mean KVM works (nested setups, missing
    permissions, broken modules), so it is tested by booting the guest to
    READY within 30 s.  The answer is cached in $VMSNAP_CACHE/guest/accel
    for this QEMU binary and host kernel; $VMSNAP_ACCEL overrides it all.
    """
    forced = os.environ.get('VMSNAP_ACCEL')
    if forced:
        return forced
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        return 'tcg'
    qemu = qemu or qemu_system()
    st = os.stat(qemu)
    key = f'{os.path.realpath(qemu)} {st.st_mtime_ns} {os.uname().release}'
    cache = guest_dir() / 'accel'
    try:
        cached_key, answer = cache.read_text().splitlines()[:2]
        if cached_key == key and answer in ('kvm', 'tcg'):
            return answer
    except (OSError, ValueError):
        pass

    answer = 'tcg'
    with tempfile.TemporaryDirectory(prefix='vmsnap-probe-') as tmp:
        sock = os.path.join(tmp, 'agent.sock')
        argv = qemu_args(accel='kvm', agent_socket=sock, qemu=qemu,
                         console_log=os.path.join(tmp, 'console.log'))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            with Agent(sock, timeout=10, proc=proc) as agent:
                agent.wait_ready(timeout=30)
                answer = 'kvm'
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        finally:
            proc.kill()
            proc.wait()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(f'{key}\n{answer}\n')
    return answer
