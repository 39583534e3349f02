"""The test machinery: the bundled test guest (guest.py) and the VM that
runs it under QEMU with QMP (vm.py), for the tests, the demo and the
benchmark.  Apart from the vmsnap package that users install."""
