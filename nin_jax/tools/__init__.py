"""Tools around the research core: evaluation, analysis, sweeps and speed measurements."""
