"""Analyses: per-part states, merges, tables and figures; plug-ins of the engine, listed in an explicit tuple."""
