"""Work over many plays or runs: sweeps, designs from the theory, the report page."""
