"""Submitting Elastune jobs to a Ray cluster through the Ray Jobs API (`elastune submit` and friends)."""
