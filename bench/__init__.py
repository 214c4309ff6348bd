"""Benchmarks of the mail node against reference servers on the same machine (`make bench`); not tests."""
