"""Aggregate-stage analysis: scaling fits on the tidy summary table (fits) and the paper-style figures (figures)."""
