"""The pretagging job, whatever executes it: settings, plan / execute / report, inputs
(sources), the run folder's layout, storage, vectors, the report and the gRPC executor."""
