"""A plugin package of example papers (``DIFFBENCH_PLUGINS=examples.papers``); see README, "Add a paper"."""
