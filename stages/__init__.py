"""What each stage does: datasets, download, features, match, evaluate, report."""
