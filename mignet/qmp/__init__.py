"""QMP, the QEMU Machine Protocol: management software drives mignet as it drives QEMU.

``server`` speaks the protocol, ``commands`` implements QEMU's migration commands on top of
:mod:`mignet.migration`, ``cli`` adds ``mignet serve``.
"""
