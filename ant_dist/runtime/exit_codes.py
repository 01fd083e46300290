"""Exit codes of every command, and the error a command reports as bad input.

    0   done
    1   an unexpected error (a traceback: a bug to report)
    2   bad input: one line on stderr saying what is wrong and how to fix it; nothing was changed
    3   a non-finite loss or gradient norm (training stopped before the update; the last good
        checkpoint is kept)
    75  stopped by a signal (SIGTERM, SIGUSR1; a launcher's death) after saving: rerun to resume
        (EX_TEMPFAIL: Slurm requeues, the reproduction runner stops cleanly)
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 75


class BadInput(RuntimeError):
    """Bad input or state that stops a command with a clear one-line message (exit EXIT_BAD_INPUT)."""
