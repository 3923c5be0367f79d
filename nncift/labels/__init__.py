"""Teacher labels: the pair plan (quadrants, blocks), the label worker and the active design."""
