"""What the trainer logs every log_every steps: sums over the steps since the last log, read from the
device once, at the log step (a per-step read would make the CPU wait for the GPU every step).

    loss                  mean over every trained token of the window's steps (not the last step's)
    trained_tokens        how many tokens that mean is over
    tokens, tokens_per_s  tokens fed to the model, padding included, all ranks, each once
    trained_tokens_per_s  tokens with a loss, all ranks
    step_time_s           this rank's mean step time (on GPUs timed with CUDA events: the device's
                          time, read at the log step, not the host's time to queue the work)
    aux_loss              mixture of experts: the routers' load-balancing loss (launcher.moe), mean
                          over the window's micro-steps (the objective is loss + coef x aux_loss)
    expert_tokens_min/max mixture of experts: tokens routed to the least and the most loaded expert
                          of any MoE layer, per step (trained positions, all ranks)
"""

import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from launcher.metrics import mfu, peak_memory_gib


class LogWindow:
    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world = device, world_size
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # stays on the device
        self.global_trained = 0.0  # every rank's trained tokens, known from the step's agreement
        self.tokens = self.rows = 0
        self.steps = 0
        self.step_time = 0.0  # this rank's total over the window's steps (CPU)
        self.step_events = []  # (start, end) CUDA events of the window's steps (GPU)
        self._began = None
        self.data_wait = 0.0  # this rank's longest wait for a step's batches
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's shares of the aux loss
        self.aux_steps = torch.zeros((), dtype=torch.float64, device=self.device)  # micro-steps with a trained token on some rank
        self.expert_counts = None  # (MoE layers, experts) selections, all ranks (None: a dense model)

    def add_micro_batch(self, loss_sum: torch.Tensor, batch: Dict, routing=None) -> None:
        self.loss_sum += loss_sum.detach()
        self.tokens += batch["input_ids"].numel()
        self.rows += batch["rows"]
        if routing is not None:  # (this rank's aux share, every rank's selections)
            aux, counts = routing
            self.aux_sum += aux.detach()
            self.aux_steps += (counts.sum() > 0).double()  # a micro-step with nothing trained anywhere has no aux loss
            self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts

    def begin_step(self) -> None:
        if self.device.type == "cuda":
            self._began = torch.cuda.Event(enable_timing=True)
            self._began.record()
        else:
            self._began = time.perf_counter()

    def end_step(self, global_trained: float, data_wait: float) -> None:
        self.steps += 1
        self.global_trained += global_trained
        self.data_wait = max(self.data_wait, data_wait)
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.step_events.append((self._began, end))
        else:
            self.step_time += time.perf_counter() - self._began

    def _step_time_total(self) -> float:
        if self.step_events:
            self.step_events[-1][1].synchronize()  # elapsed_time needs both events done; steps end in order
        return self.step_time + sum(a.elapsed_time(b) / 1000 for a, b in self.step_events)

    def row(self, n_params: int, peak_flops: Optional[float]) -> Dict:
        """The window's metrics from every rank: one all-gather, so stragglers show by rank."""
        mean_step = self._step_time_total() / max(self.steps, 1)
        mine = torch.tensor([0.0, self.tokens, self.rows, mean_step, peak_memory_gib(), self.data_wait, 0.0],
                            dtype=torch.float64, device=self.device)
        mine[0], mine[6] = self.loss_sum, self.aux_sum
        ranks = torch.empty(self.world * mine.numel(), dtype=mine.dtype, device=self.device)
        dist.all_gather_into_tensor(ranks, mine)
        ranks = ranks.view(self.world, -1).cpu()
        elapsed = time.perf_counter() - self.start
        loss_sum, tokens, rows = ranks[:, :3].sum(0).tolist()
        step_times = ranks[:, 3]
        row = {
            "loss": loss_sum / max(self.global_trained, 1),
            "trained_tokens": int(self.global_trained),  # in the window, all ranks: the loss's weight
            "tokens": int(tokens),  # fed in the window, all ranks, each once (a sequence-parallel shard is a part of a row)
            "tokens_per_s": tokens / elapsed,
            "tokens_per_s_per_rank": tokens / elapsed / self.world,
            "trained_tokens_per_s": self.global_trained / elapsed,
            "rows_per_s": rows / elapsed,
            "step_time_s": mean_step,  # this rank's mean over the window
            "peak_mem_gib": peak_memory_gib(),
            "mfu": mfu(n_params, tokens / elapsed / self.world, peak_flops),
            "step_time_min_s": step_times.min().item(),
            "step_time_max_s": step_times.max().item(),
            "slowest_rank": int(step_times.argmax()),
            "peak_mem_gib_max": ranks[:, 4].max().item(),
            "data_wait_s_max": ranks[:, 5].max().item(),
        }
        if self.expert_counts is not None:
            per_step = self.expert_counts.cpu() / max(self.steps, 1)
            row.update(aux_loss=ranks[:, 6].sum().item() / max(self.aux_steps.item(), 1),
                       expert_tokens_min=per_step.min().item(), expert_tokens_max=per_step.max().item())
        return row
