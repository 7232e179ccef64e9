"""Training: the run (flags, strategy, folder), the fit loop with its callbacks, optimisers, evaluation, reports."""
