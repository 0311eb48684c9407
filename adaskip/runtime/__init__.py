"""Runtime: engines (torch reference; graph backends later) and the Generator on top."""
