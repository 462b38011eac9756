"""Pictures and reports: the report stage (tables, plots, HTML/Markdown), correspondence drawings, match-pair."""
