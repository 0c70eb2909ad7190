"""The model registry and the database it lives in: connection settings (a Cassandra node or Astra DB),
sessions and schema (db), versioned model archives and aliases (store), and the mnist-registry command (cli).
Training and serving both import it; it imports nothing of theirs."""
