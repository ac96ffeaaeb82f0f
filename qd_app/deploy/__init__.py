"""A Flower deployment on this machine: processes, the Flower connection, keys and certificates."""
