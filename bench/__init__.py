"""``pretag bench``: model-only, server end-to-end and whole-job benchmarks."""
