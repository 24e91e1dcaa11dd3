"""Benchmarks: the pre-migration Flask app (`bench.flask_app`) is the baseline."""
