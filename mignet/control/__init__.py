"""The control plane: QMP server and commands, migration options, and the controller that
runs migrations for QMP (what QEMU's migration.c does for its monitor)."""
