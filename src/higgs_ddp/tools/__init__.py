"""Commands around training: export, plot, doctor, benchmark, demo data."""
