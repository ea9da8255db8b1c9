"""Layer 1, pure math and integers: windows, token statistics, units, calibration sums and the
document bootstrap. Imports nothing from the layers above (model, producers, analyses, engine, view, cli)."""
