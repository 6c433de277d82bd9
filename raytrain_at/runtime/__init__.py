"""Runtime plumbing every command shares: the console, where files go, starting Ray, and the
driver's handling of Ray worker output."""
