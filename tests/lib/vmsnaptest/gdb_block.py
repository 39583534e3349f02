"""gdb script: the request counters of every BlockBackend and node,
the clocks and the vCPUs' wakeup state.

Sourced by VM.hang_report() (gdb -x) in a QEMU that stopped doing I/O:
a BlockBackend left quiesced, a request parked in its queue or counted
in flight forever tells where a request was lost; a stopped virtual
clock or a halted vCPU with an interrupt pending, that no wakeup came.
"""

import gdb  # pylint: disable=import-error


def name(field):
    """A char array or pointer field as a Python string."""
    try:
        if field.type.code == gdb.TYPE_CODE_PTR and not int(field):
            return '-'
        return field.string() or '-'
    except gdb.error:
        return '?'


def backends():
    bb = gdb.parse_and_eval('block_backends')['tqh_first']
    while int(bb):
        b = bb.dereference()
        root = b['root']
        node = (name(root.dereference()['bs'].dereference()['node_name'])
                if int(root) else '-')
        queued = int(b['queued_requests']['entries']['sqh_first']) != 0
        print(f"BlockBackend {name(b['name'])!r} root={node} "
              f"in_flight={int(b['in_flight'])} "
              f"quiesce_counter={int(b['quiesce_counter'])} "
              f"queued_requests={queued} "
              f"disable_request_queuing={bool(b['disable_request_queuing'])} "
              f"ctx={b['ctx']}")
        bb = b['link']['tqe_next']


def nodes():
    bs = gdb.parse_and_eval('all_bdrv_states')['tqh_first']
    while int(bs):
        b = bs.dereference()
        drv = (name(b['drv'].dereference()['format_name'])
               if int(b['drv']) else '-')
        print(f"node {name(b['node_name'])!r} drv={drv} "
              f"in_flight={int(b['in_flight'])} "
              f"quiesce_counter={int(b['quiesce_counter'])} "
              f"ctx={b['aio_context']}")
        bs = b['bs_list']['tqe_next']


def clocks():
    for i, clock in enumerate(('realtime', 'virtual', 'host',
                               'virtual_rt')):
        enabled = gdb.parse_and_eval(f'qemu_clocks[{i}].enabled')
        print(f'clock {clock} enabled={bool(enabled)}')
    ticks = gdb.parse_and_eval('timers_state.cpu_ticks_enabled')
    print(f'cpu_ticks_enabled={int(ticks)}')


def cpus():
    cpu = gdb.parse_and_eval('cpus_queue')['tqh_first']
    while int(cpu):
        c = cpu.dereference()
        print(f"cpu {int(c['cpu_index'])} halted={int(c['halted'])} "
              f"interrupt_request={int(c['interrupt_request']):#x} "
              f"stop={bool(c['stop'])} stopped={bool(c['stopped'])}")
        cpu = c['node']['tqe_next']


for fn in (backends, nodes, clocks, cpus):
    try:
        fn()
    except gdb.error as err:
        print(f'{fn.__name__}: {err}')
