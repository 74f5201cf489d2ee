"""The dom0 companion: CLI, initrd builder, kernel cache, qemu/xl backends, reports."""
