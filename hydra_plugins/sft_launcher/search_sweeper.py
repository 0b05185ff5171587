"""`hydra/sweeper=search`: a search (Optuna TPE sampling, successive-halving pruning) instead of a grid.

Hydra hands the sweeper the command's overrides; launcher.sweep.start does the rest: it checks the
space, writes the sweep dir and starts the controller (a Slurm job, or the foreground locally).
"""

from typing import Any, List

from hydra.plugins.sweeper import Sweeper


class SearchSweeper(Sweeper):
    def __init__(self, **kwargs: Any) -> None:
        self.config = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def sweep(self, arguments: List[str]) -> Any:
        from hydra.core.utils import setup_globals

        from launcher.sweep.start import start_search

        setup_globals()
        return start_search(self.config, self.hydra_context, arguments)
