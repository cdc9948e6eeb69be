"""The ``lsi`` emulator kind: QEMU's own x-remote process emulating one
LSI53C895A controller, started, confined and watched by mplaunch."""
