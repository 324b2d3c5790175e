"""What a run writes and shows: JSON report, figures, HTML page."""
