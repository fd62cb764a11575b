"""The control plane: the state store (SQLite embedded, etcd for many hosts), scheduling."""
