"""Searches: Optuna samples (TPE) and prunes (successive halving at sweep.rungs) trials of one config.

`sft -m hydra/sweeper=search KEY=SPACE ...` (launcher.sweep.start) checks the space and starts the
controller (launcher.sweep.controller); each trial judges itself at its rungs (launcher.trial);
`sft-jobs sweep` prints the leaderboard (launcher.jobs.leaderboard).
"""
