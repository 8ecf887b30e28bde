"""The benchmark: ingest and end-to-end throughput against floors measured in the same run."""
