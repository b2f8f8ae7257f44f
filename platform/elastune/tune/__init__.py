"""Population-based schedule search on Ray Tune (issue in progress): the explore/exploit rules
first (`pbt`), pure functions the tuning driver will apply."""
