"""Stage two: fit a head on cached features and leave a run; score a run again."""
