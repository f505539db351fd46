"""The ``noisescale`` command line (typer)."""
