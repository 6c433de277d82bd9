"""Runtime plumbing every command shares: the console, where files go, starting Ray, the
driver's handling of Ray worker output, and local ports."""
