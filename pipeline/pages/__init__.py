"""The report page: one offline HTML file per run and per audit (pipeline/pages/report.py)."""
