"""Reading runs back from the store: summary tables, the HTML report, recommendations, per-layer bit allocation."""
