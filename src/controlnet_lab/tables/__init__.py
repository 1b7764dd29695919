"""Paper-style tables from a sweep: sweeps.py (reading it), statistics.py (means, intervals, differences), render.py
(the cells a reader sees), plots.py, report.py (what eval/tables.py writes and logs). Imports no torch."""
