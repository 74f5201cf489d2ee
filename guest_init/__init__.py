"""The in-guest agent: PID 1 of a Supercharge initramfs.

Everything that both the guest and dom0 need (plan schema, report records,
file operations, device identification) lives here, because it must run inside
the frozen binary.  This package never imports ``dom0`` and keeps its start-up
imports to the standard library; heavy libraries are imported where first used.
"""
