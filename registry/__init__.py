"""The model registry and the database it lives in: connection settings (a Cassandra node or Astra DB),
sessions and schema (db), versioned model archives and aliases (store), and the mnist-registry command (cli).
The rules the serving container shares with it, without torch or the database driver: what a .mar must hold
(model_archive), the names of versions and aliases (names), settings read from the environment (environment).
Training and serving both import it; it imports nothing of theirs."""
