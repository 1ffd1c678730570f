"""Progress lines of long jobs (the training loop's ETA, the test responses): durations at a glance."""


def format_duration(seconds):
    """45s, 3m12s, 2h05m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
