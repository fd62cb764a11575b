"""Multi-host pieces on etcd: a small etcd v3 client and the per-host share failover agent."""
