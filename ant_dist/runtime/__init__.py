"""What every stage needs from the operating system, and nothing of any stage: locks, stop
signals, process lifetimes, atomic writes and output folders, exit codes, process-group teardown."""
