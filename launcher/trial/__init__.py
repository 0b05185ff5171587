"""A search trial as its ranks see it: the study it reports to (study), the space it was sampled
from (space), and its rungs (rungs: report, judge, pause or prune). The trainer calls it through one
hook per step (`TrialRungs`); the search controller (launcher.sweep) drives trials from above."""
