"""emrctl: the flexemr admin CLI. Never imports torch (it must answer fast)."""
