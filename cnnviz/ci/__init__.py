"""CI: `--expect` gates judged against a run's numbers, and JUnit XML of the verdicts."""
