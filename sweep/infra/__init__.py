"""Generic helpers every stage may use: checksummed cache, progress output, secret redaction, signals, GPU pool."""
