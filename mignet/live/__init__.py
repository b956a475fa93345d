"""Live precopy: a running guest, kernel dirty tracking and the rounds of QEMU's precopy."""
