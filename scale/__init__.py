"""pretag on a Ray cluster: the same job as ``pretag run`` with a Ray Data executor."""
