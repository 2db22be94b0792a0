"""The `natgrad` command line: demo, report, metrics."""
