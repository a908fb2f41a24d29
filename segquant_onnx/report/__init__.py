"""Reports: the JSON/Markdown report and the printed summaries."""
