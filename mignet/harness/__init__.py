"""Test harnesses outside the core: the soft-RoCE (rdma_rxe) guest launcher."""
