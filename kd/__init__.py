"""The orchestrator on top of the layers (pipelines < search < registry < benchmarks < kd): the ``main`` chain
and the ``kd`` command line."""
