"""Helpers for testing and benchmarking live VM snapshots with the patched QEMU."""
