"""Multi-host pieces on etcd: a small etcd v3 client (the etcd state store's)."""
