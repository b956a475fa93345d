"""The guest: RAM blocks as numpy memory, device state, the vCPU workload that dirties RAM,
and the on-disk guest directory. Knows memory and fields, never a connection."""
