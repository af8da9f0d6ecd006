"""The schema of a grid point's config (dataclasses and the error type for values that break it)."""
