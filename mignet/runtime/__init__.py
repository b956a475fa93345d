"""Who may run when: the big lock, greenlet coroutines on asyncio, QEMU's main loop."""
