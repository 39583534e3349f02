"""The VM state saved into, and loaded from, a Ceph RBD image.

Where VM disks live on Ceph (Proxmox, OpenStack), so does the VM state:
the block-node transport saves it into an rbd node like into any other.
These tests run a one-node cluster from Debian's packages
(scripts/ceph-cluster.sh: a monitor, a manager and a bluestore OSD on
127.0.0.1) and a qtest-accelerated QEMU (no guest: the vCPUs never run,
QEMU's qtest protocol writes and reads guest RAM), and check:

 - a start-instant save (background-snapshot) straight into an rbd
   protocol node loads into a fresh QEMU (-incoming defer) with the RAM
   as it was when the save began, not as the source changed it after;
 - an end-instant save through the wrapper (vmsnap.state, a node) into a
   raw node over rbd loads the same way through the wrapper;
 - "rbd snap create" of the state image while nothing writes to it
   keeps that state: after a second save into the same image, the
   snapshot (opened read-only) loads the first state, the image the
   second; and a blank image fails to load, leaving QEMU running;
 - a start-instant snapshot-group of a disk on rbd as an rbd snapshot,
   with the state in another rbd image: the snapshot, taken as
   TAG.incomplete, has the tag once the group completes, and
   snapshot-group-load reverts the disk and loads the RAM in place;
 - "vmsnap drain-snapshot ... rbd POOL/IMAGE@SNAP" snapshots the image
   of a drained disk in Ceph: the snapshot holds what was written
   before the drain, the image what was written after it.

They are skipped when the QEMU build has no rbd driver (configure
--enable-rbd, with librbd-dev) or, without a cluster given, when the
Ceph daemons are not installed.  Given VMSNAP_CEPH_CONF (and
VMSNAP_CEPH_POOL), as "make check-rbd" does, they use that cluster and
remove their images; otherwise each test starts a cluster of its own
(about 30 s) and stops it.  CEPH_CONF is never used: it may name a
cluster that matters.

Run with:

    make check-rbd
    PYTHONPATH=python:tests/lib $venv/bin/avocado run tests/rbd/test_rbd_state.py
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from avocado import Test, skipUnless

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmsnap import state
from vmsnaptest import guest
from vmsnaptest.vm import stop_qemu

CLUSTER_SH = guest.REPO / 'scripts' / 'ceph-cluster.sh'
MEM_MIB = 64
# qwords written at these guest-physical addresses, with a seed in them
PATTERN_ADDRS = [0x100000 + i * 0x10000 for i in range(64)]
FILL = (0x1000000, 0x1000000)   # 16 MiB of guest RAM filled with a byte
MIGRATION_TIMEOUT = 60          # s


def qemu_rbd():
    """Why QEMU cannot be used here, or None: it has the rbd driver."""
    try:
        img = guest.qemu_img()
    except FileNotFoundError as e:
        return str(e)
    out = subprocess.run([img, '--help'], capture_output=True, text=True,
                         check=False).stdout
    # "Supported image formats:", a blank line, the names, a blank line
    _, _, formats = out.partition('formats:')
    if 'rbd' not in formats.strip().split('\n\n')[0].split():
        return (f'{img} has no rbd driver (configure --enable-rbd, with '
                'librbd-dev and librados-dev installed)')
    return None


def ceph_missing():
    """Why no cluster can be had, or None."""
    if os.environ.get('VMSNAP_CEPH_CONF'):
        return None
    missing = [c for c in ('ceph-mon', 'ceph-mgr', 'ceph-osd', 'ceph', 'rbd',
                           'monmaptool') if shutil.which(c) is None]
    if missing:
        return (f'no {" ".join(missing)}: install ceph-mon ceph-mgr ceph-osd '
                'ceph-common, or give VMSNAP_CEPH_CONF')
    return None


QEMU_WHY = qemu_rbd()
CEPH_WHY = ceph_missing()


def pattern(seed):
    return {a: (seed << 48) | (0x5a5a << 16) | i
            for i, a in enumerate(PATTERN_ADDRS)}


class QtestVM:
    """A qtest-accelerated QEMU with a QMP monitor (for this test) and
    another one (for the vmsnap wrapper), and the qtest protocol."""

    def __init__(self, name, sockdir, logdir, extra_args=()):
        self.name = name
        self.qmp_sock = os.path.join(sockdir, f'{name}-qmp.sock')
        self.wrapper_sock = os.path.join(sockdir, f'{name}-qmp1.sock')
        self.qtest_sock = os.path.join(sockdir, f'{name}-qtest.sock')
        self.log = os.path.join(logdir, f'{name}-qemu.log')
        self.argv = [guest.qemu_system(), '-accel', 'qtest',
                     '-display', 'none', '-nic', 'none', '-m', str(MEM_MIB),
                     '-L', str(guest.FIRMWARE_DIR),
                     '-qmp', f'unix:{self.qmp_sock},server=on,wait=off',
                     '-qmp', f'unix:{self.wrapper_sock},server=on,wait=off',
                     '-qtest', f'unix:{self.qtest_sock},server=on,wait=off',
                     *extra_args]
        self.proc = self.qmp = self.qtest_file = None

    def launch(self):
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                qmp = QEMUMonitorProtocol(self.qmp_sock)
                qmp.connect()
                qmp.settimeout(60)
                self.qmp = qmp
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.qtest_sock)
                self.qtest_file = sock.makefile('rw')
                return self
            except (OSError, QMPError) as e:
                if self.proc.poll() is not None or \
                        time.monotonic() > deadline:
                    raise RuntimeError(f'{self.name}: QEMU did not start: '
                                       f'{e}; {self.diagnostics()}') from e
                time.sleep(0.05)

    def qtest(self, line):
        """Send one qtest command; the rest of its OK answer."""
        self.qtest_file.write(line + '\n')
        self.qtest_file.flush()
        answer = self.qtest_file.readline().split()
        if not answer or answer[0] != 'OK':
            raise AssertionError(f'qtest {line!r}: {answer}; '
                                 f'{self.diagnostics()}')
        return answer[1:]

    def write_pattern(self, pat):
        for addr, val in pat.items():
            self.qtest(f'writeq {addr:#x} {val:#x}')

    def read_pattern(self):
        return {a: int(self.qtest(f'readq {a:#x}')[0], 16)
                for a in PATTERN_ADDRS}

    def cmd(self, name, **args):
        """QMP command name; argument names with '_' for '-'."""
        return self.qmp.cmd(name, **{k.replace('_', '-'): v
                                     for k, v in args.items()})

    def wait_migration(self):
        """Poll query-migrate until the migration has ended; its answer."""
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            info = self.cmd('query-migrate')
            if info.get('status') in ('completed', 'failed', 'cancelled'):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f'{self.name}: migration still '
                                     f'{info.get("status")} after '
                                     f'{MIGRATION_TIMEOUT} s')
            time.sleep(0.05)

    def diagnostics(self):
        try:
            with open(self.log, errors='replace') as f:
                return f'{self.name} log: ' + \
                    ' | '.join(f.read().splitlines()[-10:])
        except OSError:
            return f'{self.name}: no log'

    def shutdown(self):
        if self.qtest_file is not None:
            try:
                self.qtest_file.close()
            except OSError:
                pass
        stop_qemu(self.proc, self.qmp)
        self.qmp = None


class RbdState(Test):
    """VM state into and out of rbd images of a one-node cluster."""

    timeout = 240
    vms = images = ()
    own_cluster = sockdir = None

    # on setUp, so that a skipped test starts no cluster
    @skipUnless(QEMU_WHY is None, QEMU_WHY)
    @skipUnless(CEPH_WHY is None, CEPH_WHY)
    def setUp(self):
        self.started = time.monotonic()
        # avocado's workdir path is too long for a unix socket (108 bytes)
        self.sockdir = tempfile.mkdtemp(prefix='vmsnap-rbd-')
        self.vms = []
        self.images = []
        self.own_cluster = None
        self.conf = os.environ.get('VMSNAP_CEPH_CONF')
        self.pool = os.environ.get('VMSNAP_CEPH_POOL', 'vmsnap')
        if not self.conf:
            self.own_cluster = os.path.join(self.sockdir, 'ceph')
            env = self.cluster('start')
            self.conf = env['VMSNAP_CEPH_CONF']
            self.pool = env['VMSNAP_CEPH_POOL']
            self.log.info('cluster started in %.1f s',
                          time.monotonic() - self.started)
        self.prefix = f'vmsnap-test-{uuid.uuid4().hex[:8]}'

    def tearDown(self):
        started = getattr(self, 'started', time.monotonic())
        try:
            for vm in self.vms:
                try:
                    vm.shutdown()
                except Exception as e:  # pylint: disable=broad-except
                    self.log.warning('%s: shutdown: %s', vm.name, e)
        finally:
            if self.own_cluster:
                self.cluster('stop')
            else:
                for image in self.images:
                    for op in ('snap purge', 'rm'):
                        subprocess.run(['rbd', '-c', self.conf, *op.split(),
                                        f'{self.pool}/{image}'],
                                       capture_output=True, check=False)
            if self.sockdir:
                shutil.rmtree(self.sockdir, ignore_errors=True)
        self.log.info('test took %.1f s', time.monotonic() - started)

    def cluster(self, action):
        env = dict(os.environ, VMSNAP_CEPH_DIR=self.own_cluster)
        env.pop('VMSNAP_CEPH_POOL', None)
        out = subprocess.run(['bash', str(CLUSTER_SH), action], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise AssertionError(f'ceph-cluster.sh {action} failed: '
                                 f'{out.stderr.strip()}')
        return dict(line.split('=', 1) for line in out.stdout.splitlines()
                    if '=' in line)

    def rbd(self, *args):
        out = subprocess.run(['rbd', '-c', self.conf, *args],
                             capture_output=True, text=True, check=False,
                             timeout=120)
        if out.returncode != 0:
            raise AssertionError(f'rbd {" ".join(args)}: {out.stderr}')
        return out.stdout

    def create_image(self, tag, size):
        image = f'{self.prefix}-{tag}'
        self.rbd('create', '--size', f'{size}B', f'{self.pool}/{image}')
        self.images.append(image)
        return image

    def vm(self, name, incoming=False):
        vm = QtestVM(name, self.sockdir, self.logdir,
                     ['-incoming', 'defer'] if incoming else [])
        self.vms.append(vm)
        return vm.launch()

    def source(self, name, seed):
        """A qtest VM with pattern(seed) and 16 MiB filled in its RAM."""
        vm = self.vm(name)
        vm.write_pattern(pattern(seed))
        vm.qtest(f'memset {FILL[0]:#x} {FILL[1]:#x} 0x{seed:02x}')
        return vm

    def add_rbd(self, vm, image, raw=False, snapshot=None):
        """blockdev-add the image (raw on top with raw); the node name."""
        opts = {'driver': 'rbd', 'node_name': 'state-rbd',
                'pool': self.pool, 'image': image, 'conf': self.conf}
        if snapshot:
            opts.update(snapshot=snapshot, read_only=True)
        vm.cmd('blockdev-add', **opts)
        if not raw:
            return 'state-rbd'
        vm.cmd('blockdev-add', driver='raw', node_name='state',
               file='state-rbd', read_only=bool(snapshot))
        return 'state'

    @staticmethod
    def channels(node):
        return [{'channel-type': 'main',
                 'addr': {'transport': 'block-node', 'node-name': node}}]

    def save(self, vm, node, start=True):
        vm.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'mapped-ram', 'state': True},
            {'capability': 'background-snapshot', 'state': start}])
        t0 = time.monotonic()
        vm.cmd('migrate', channels=self.channels(node))
        info = vm.wait_migration()
        self.assertEqual(info['status'], 'completed',
                         f'save: {info.get("error-desc")}; '
                         f'{vm.diagnostics()}')
        self.log.info('%s: saved %d bytes of RAM in %.2f s', vm.name,
                      info['ram']['transferred'], time.monotonic() - t0)
        self.assertTrue(vm.cmd('query-status')['running'])

    def load(self, name, image, raw=False, snapshot=None):
        """A fresh VM that loads the state from image; its query-migrate."""
        vm = self.vm(name, incoming=True)
        node = self.add_rbd(vm, image, raw=raw, snapshot=snapshot)
        vm.cmd('migrate-set-capabilities', capabilities=[
            {'capability': 'mapped-ram', 'state': True}])
        vm.cmd('migrate-incoming', channels=self.channels(node),
               exit_on_error=False)
        return vm, vm.wait_migration()

    def assert_loaded(self, vm, info, seed):
        self.assertEqual(info['status'], 'completed',
                         f'load: {info.get("error-desc")}; '
                         f'{vm.diagnostics()}')
        self.assertEqual(vm.cmd('query-status')['status'], 'running')
        self.assertEqual(vm.read_pattern(), pattern(seed))
        self.assertEqual(vm.qtest(f'readb {FILL[0] + FILL[1] - 1:#x}'),
                         [f'0x{seed:016x}'])

    def test_start_instant(self):
        src = self.source('src', 0x11)
        size = src.cmd('query-vmstate-size')['total']
        image = self.create_image('start', size)
        self.log.info('rbd image %s: %s', image,
                      self.rbd('info', f'{self.pool}/{image}').split('\n')[1])
        self.save(src, self.add_rbd(src, image))
        # what the source does after the save is not in the state
        src.write_pattern(pattern(0x22))
        self.log.info('rbd du: %s', self.rbd('du', f'{self.pool}/{image}'))
        dst, info = self.load('dst', image)
        self.assert_loaded(dst, info, 0x11)

    def test_end_instant_wrapper_raw(self):
        src = self.source('src', 0x33)
        size = src.cmd('query-vmstate-size')['total']
        image = self.create_image('end', size)
        node = self.add_rbd(src, image, raw=True)
        res = asyncio.run(state.save_state(src.wrapper_sock, node=node,
                                           mode='end', log=self.log.info))
        self.assertTrue(res.ok, f'save: {res.error}; {src.diagnostics()}')
        self.assertTrue(src.cmd('query-status')['running'])
        dst = self.vm('dst', incoming=True)
        node = self.add_rbd(dst, image, raw=True)
        res = asyncio.run(state.load_state(dst.wrapper_sock, node=node,
                                           log=self.log.info))
        self.assertTrue(res.ok, f'load: {res.error}; {dst.diagnostics()}')
        self.assert_loaded(dst, {'status': 'completed'}, 0x33)

    def test_snapshot_and_blank(self):
        src = self.source('src', 0x44)
        size = src.cmd('query-vmstate-size')['total']
        image = self.create_image('snap', size)
        node = self.add_rbd(src, image)
        self.save(src, node)
        # nothing writes to the image now: snapshot it (the node stays)
        t0 = time.monotonic()
        self.rbd('snap', 'create', f'{self.pool}/{image}@first')
        self.log.info('rbd snap create: %.2f s', time.monotonic() - t0)
        self.assertIn('first', self.rbd('snap', 'ls', f'{self.pool}/{image}'))
        # a second save, of other RAM, into the same image
        src.write_pattern(pattern(0x55))
        src.qtest(f'memset {FILL[0]:#x} {FILL[1]:#x} 0x55')
        self.save(src, node)
        dst, info = self.load('dst-snap', image, snapshot='first')
        self.assert_loaded(dst, info, 0x44)
        dst, info = self.load('dst-head', image, raw=True)
        self.assert_loaded(dst, info, 0x55)

        # negative control: a blank image holds no state; QEMU stays
        blank = self.create_image('blank', size)
        with self.assertRaisesRegex(QMPError,
                                    "Node 'state-rbd' holds no VM state"):
            self.load('dst-blank', blank)
        self.assertEqual(self.vms[-1].cmd('query-status')['status'],
                         'inmigrate')

    def wait_job(self, vm, job_id):
        """Wait for job @job_id to conclude, dismiss it; its error."""
        deadline = time.monotonic() + 120
        while True:
            job = next(j for j in vm.cmd('query-jobs') if j['id'] == job_id)
            if job['status'] == 'concluded':
                vm.cmd('job-dismiss', id=job_id)
                return job.get('error')
            self.assertLess(time.monotonic(), deadline,
                            f'{job}; {vm.diagnostics()}')
            time.sleep(0.05)

    def test_group_internal_rbd_disk(self):
        """A start-instant snapshot-group of a disk on rbd, as an rbd
        snapshot, with the state in another rbd image: the snapshot,
        taken as GROUP.incomplete, is renamed to the tag when the group
        completes (rbd_snap_rename), and snapshot-group-load reverts the
        disk and loads the RAM in place."""
        src = self.source('src', 0x66)
        disk = self.create_image('gdisk', 16 * 1024 * 1024)
        src.cmd('blockdev-add', driver='rbd', node_name='disk',
                pool=self.pool, image=disk, conf=self.conf)
        self.disk_io(src, 'write -P 0x11 0 64k')
        size = src.cmd('query-vmstate-size')['total']
        node = self.add_rbd(src, self.create_image('gstate', size))
        src.cmd('snapshot-group', job_id='group', tag='grp',
                disks=[{'node-name': 'disk', 'action': 'internal'}],
                vmstate={'target': 'block-node', 'node-name': node},
                instant='start')
        self.assertIsNone(self.wait_job(src, 'group'))
        snaps = self.rbd('snap', 'ls', f'{self.pool}/{disk}')
        self.log.info('rbd snap ls after the group:\n%s', snaps)
        self.assertIn(' grp ', snaps)
        self.assertNotIn('incomplete', snaps)

        # After the group, the guest's RAM and disk change
        src.write_pattern(pattern(0x77))
        self.disk_io(src, 'write -P 0x22 0 64k')
        src.cmd('snapshot-group-load', job_id='load', tag='grp',
                vmstate={'node-name': node})
        self.assertIsNone(self.wait_job(src, 'load'))
        self.assertEqual(src.cmd('query-status')['status'], 'running')
        self.assertEqual(src.read_pattern(), pattern(0x66))
        out = src.cmd('human-monitor-command',
                      command_line='qemu-io disk "read -P 0x11 0 64k"')
        self.assertNotIn('verification failed', out)

    def disk_io(self, vm, cmd, node='disk'):
        out = vm.cmd('human-monitor-command',
                     command_line=f'qemu-io {node} "{cmd}"')
        self.assertNotIn('error', out.lower(), out)

    def image_pattern(self, image, snapshot=None):
        """The byte the first 64 KiB of the image (or snapshot) hold."""
        spec = {'driver': 'raw',
                'file': {'driver': 'rbd', 'pool': self.pool, 'image': image,
                         'conf': self.conf}}
        if snapshot:
            spec['file']['snapshot'] = snapshot
        out = os.path.join(self.sockdir, 'copy.raw')
        subprocess.run([guest.qemu_img(), 'convert', '-U', '-O', 'raw',
                        f'json:{json.dumps(spec)}', out], check=True,
                       capture_output=True)
        with open(out, 'rb') as f:
            data = set(f.read(65536))
        return hex(data.pop()) if len(data) == 1 else f'mixed {data}'

    def test_drain_snapshot_method_rbd(self):
        vm = self.vm('src')
        image = self.create_image('disk', 16 * 1024 * 1024)
        vm.cmd('blockdev-add', driver='rbd', node_name='disk-rbd',
               pool=self.pool, image=image, conf=self.conf)
        vm.cmd('blockdev-add', driver='raw', node_name='disk',
               file='disk-rbd')
        self.disk_io(vm, 'write -P 0x11 0 64k')
        argv = [sys.executable, '-m', 'vmsnap', 'drain-snapshot',
                '--qmp', vm.wrapper_sock, '--nodes', 'disk', '--timeout',
                '30', '--json', 'rbd', f'{self.pool}/{image}@backup']
        env = dict(os.environ, PYTHONPATH=str(guest.REPO / 'python'),
                   CEPH_CONF=self.conf)
        out = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             timeout=120, check=False)
        self.log.info('vmsnap drain-snapshot:\n%s', out.stdout)
        self.assertEqual(out.returncode, 0, out.stdout)
        result = json.loads([line for line in out.stdout.splitlines()
                             if line.startswith('{')][-1])
        self.assertIsNotNone(result['held_ms'])
        self.assertEqual(vm.cmd('query-block-drains'), [])
        self.disk_io(vm, 'write -P 0x22 0 64k')
        self.assertIn('backup', self.rbd('snap', 'ls',
                                         f'{self.pool}/{image}'))
        self.assertEqual(self.image_pattern(image, 'backup'), '0x11')
        self.assertEqual(self.image_pattern(image), '0x22')
