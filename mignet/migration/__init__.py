"""Migration logic: the only layer that knows both the wire format and the channels.

The loader (destination), the sender (source), live precopy rounds with kernel dirty
tracking, the rate limit, and the status machine with its counters."""
