"""Evaluation: MTEB jobs, local tasks and mirrors, the instruction tables, aggregation."""
