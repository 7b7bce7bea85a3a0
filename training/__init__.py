"""Training pipelines: data sets, loops, evaluation, registration (imports facexplain, never services' servers)."""
