"""The CPU allocator's own figures, for tests of memory."""

import torch


def allocator_peak(step):
    """The peak of the bytes the CPU allocator holds above its level when
    `step()` starts, from torch.profiler's memory events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True
    ) as profile:
        step()
    events = sorted(
        (
            e
            for e in profile.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
