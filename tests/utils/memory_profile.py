"""Memory of one training step from torch's profiler (CPU): what the plan's activation numbers are checked against."""

from torch.profiler import ProfilerActivity, profile, record_function


def profiled_step(forward, backward) -> tuple:
    """(bytes held when backward starts, peak bytes during forward and backward) above what was held
    before the step, for forward() then backward(its result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
        with record_function("backward"):
            backward(out)
    events = prof.profiler.kineto_results.events()
    backward_starts = min(e.start_ns() for e in events if e.name() == "backward")
    held = peak = at_backward = 0
    for start, size in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        held += size
        peak = max(peak, held)
        if start < backward_starts:
            at_backward = held
    return at_backward, peak
